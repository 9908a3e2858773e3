"""Training tokens per second from the default target, two ways; prints JSON.

* sampling: the target generates answers (new tokens/s by batch size: that many rows decoded together, continuous
  batching over `--prompts-per-row` times as many prompts; compiled on CUDA, where the step is a CUDA graph);
* teacher forcing: the target is run once over ShareGPT's own answers (answer tokens/s by batch size, top-k and
  features kept as `koala sample --source teacher_forced` does).

    python bench/sampling.py [--batch-sizes 1,4,16] [--device cpu|cuda] [--max-new-tokens 64] [--forced 48]
    python bench/sampling.py --device cuda --dtype bfloat16 --batch-sizes 64,256 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koala.data import prompts as P
from koala.data.teacher import force_batch, tokenize
from koala.data.generate import generate_batch
from koala.engine.compile import compiled_by_default
from koala.threads import configure_threads, cpu_model
from koala.engine.sampling import SamplingParams
from koala.engine.session import Session
from koala.targets import encode_chat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--forced", type=int, default=48, help="conversations teacher-forced per batch size")
    ap.add_argument("--forced-batch-sizes", default="1,8")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--prompts-per-row", type=int, default=1,
                    help="prompts per row: above 1 rows finish at EOS and are refilled (continuous batching)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compiled batch step (default: on CUDA only, as sampling.compile)")
    a = ap.parse_args()
    configure_threads()

    compiled = compiled_by_default(a.device) if a.compile is None else a.compile
    s = Session.open(a.target, dtype=a.dtype, device=a.device, compile=compiled)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    n_prompts = max(sizes) * a.prompts_per_row
    recs = P.load("sharegpt", limit=n_prompts * 4)
    prompts = [ids for ids in (encode_chat(s.target.tokenizer, list(r.messages)) for r in recs) if len(ids) <= 128]
    prompts = (prompts * (1 + n_prompts // max(len(prompts), 1)))[:n_prompts]
    params = SamplingParams(a.temperature, 0.95)
    eos = s.eos_ids if a.prompts_per_row > 1 else frozenset()  # one prompt per row: every row decodes to the end
    results = {}
    for bs in sizes:
        batch = prompts[:bs * a.prompts_per_row]
        # warm-up at this batch shape (a compiled step compiles, and on CUDA records its graph, per batch size), with
        # the caches already at the timed run's size, so the timed run neither re-allocates nor re-compiles
        s.engine.setup_caches(max(len(p) for p in batch) + a.max_new_tokens, batch=bs)
        generate_batch(s.engine, batch[:bs], list(range(bs)), params, 4, frozenset(), rows=bs)
        if s.engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate_batch(s.engine, batch, list(range(len(batch))), params, a.max_new_tokens, eos, rows=bs)
        if s.engine.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        new = sum(len(o.response_ids) for o in out)
        results[str(bs)] = {"prompts": len(batch), "new_tokens": new, "wall_s": round(wall, 3),
                            "tokens_per_s": round(new / wall, 1), "prompt_tokens": sum(len(p) for p in batch)}
    best = max(results, key=lambda k: results[k]["tokens_per_s"])
    forced = teacher_forcing(s, a)
    fbest = max(forced, key=lambda k: forced[k]["answer_tokens_per_s"])
    print(json.dumps({"target": s.target.info.name, "device": str(s.engine.device), "cpu": cpu_model(),
                      "gpu": torch.cuda.get_device_name() if s.engine.device.type == "cuda" else None,
                      "engine": s.mode, "prompts_per_row": a.prompts_per_row,
                      "dtype": a.dtype, "threads": torch.get_num_threads(), "max_new_tokens": a.max_new_tokens,
                      "temperature": a.temperature, "by_batch_size": results, "best_batch_size": int(best),
                      "best_tokens_per_s": results[best]["tokens_per_s"],
                      "teacher_forced": {"max_seq_len": a.max_seq_len, "by_batch_size": forced,
                                         "best_batch_size": int(fbest),
                                         "best_answer_tokens_per_s": forced[fbest]["answer_tokens_per_s"]},
                      "teacher_forced_over_sampling": round(forced[fbest]["answer_tokens_per_s"]
                                                            / results[best]["tokens_per_s"], 2)}, indent=2))


def teacher_forcing(s, a) -> dict:
    """Answer tokens/s of `koala.data.teacher.force_batch` over ShareGPT conversations that have answers."""
    tok = s.target.tokenizer
    seqs = []
    for r in P.sharegpt():
        if r.response and len(seqs) < a.forced:
            seq = tokenize(tok, r, a.max_seq_len)
            if seq is not None:
                seqs.append(seq)
    seqs.sort(key=lambda x: len(x[0]))  # as the shards batch them: similar lengths together
    force_batch(s.target.model, seqs[:2], 32, True)  # warm-up
    out = {}
    for bs in (int(x) for x in a.forced_batch_sizes.split(",")):
        t = time.perf_counter()
        for i in range(0, len(seqs), bs):
            force_batch(s.target.model, seqs[i:i + bs], 32, True, tok.pad_token_id or 0)
        wall = time.perf_counter() - t
        answer = sum(len(ids) - p for ids, p in seqs)
        out[str(bs)] = {"conversations": len(seqs), "answer_tokens": answer, "all_tokens": sum(len(x) for x, _ in seqs),
                        "wall_s": round(wall, 3), "answer_tokens_per_s": round(answer / wall, 1)}
    return out


if __name__ == "__main__":
    main()
