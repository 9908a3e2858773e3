"""Training tokens per second from the default target, two ways, in each compute dtype (float32, and bf16 autocast
over the same float32 weights) in one run; prints JSON, with how far bf16's stored distributions are from fp32's.

* sampling: the target generates answers (new tokens/s by batch size: that many rows decoded together, continuous
  batching over `--prompts-per-row` times as many prompts; compiled on CUDA, where the step is a CUDA graph);
* teacher forcing: the target is run once over ShareGPT's own answers (answer tokens/s by batch size, top-k and
  features kept as `koala sample --source teacher_forced` does).

    python bench/sampling.py [--batch-sizes 1,4,16] [--device cpu|cuda] [--max-new-tokens 64] [--forced 48]
    python bench/sampling.py --teacher-only --out bench/results/teacher_forcing.json   # fp32 and bf16 side by side
    python bench/sampling.py --device cuda --dtype bfloat16 --batch-sizes 64,256 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import time

import torch

from koala import benchinfo, precision
from koala.data import prompts as P
from koala.data.teacher import force_batch, tokenize
from koala.data.generate import generate_batch
from koala.engine.compile import compiled_by_default
from koala.precision import ComputeDtype
from koala.threads import configure_threads
from koala.engine.sampling import SamplingParams
from koala.engine.session import Session
from koala.targets import encode_chat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the target's weights")
    ap.add_argument("--compute-dtypes", default="float32,bfloat16",
                    help="compute dtypes measured side by side (bf16: autocast over the float32 weights)")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--forced", type=int, default=48, help="conversations teacher-forced per batch size")
    ap.add_argument("--forced-batch-sizes", default="1,8")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=32, help="conversations from the end of ShareGPT (never in the "
                    "profiles' teacher-forced sets, which read it from the start) on which bf16 is compared to fp32")
    ap.add_argument("--teacher-only", action="store_true", help="measure teacher forcing only (no sampling)")
    ap.add_argument("--prompts-per-row", type=int, default=1,
                    help="prompts per row: above 1 rows finish at EOS and are refilled (continuous batching)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compiled batch step (default: on CUDA only, as sampling.compile)")
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. bench/results/teacher_forcing.json)")
    a = ap.parse_args()
    configure_threads()

    compiled = compiled_by_default(a.device) if a.compile is None else a.compile
    s = Session.open(a.target, dtype=a.dtype, device=a.device, compile=compiled)
    by_dtype = {}
    for name in a.compute_dtypes.split(","):
        compute = ComputeDtype(name, "forced by the bench")
        with compute.autocast(s.engine.device):
            sampled = {} if a.teacher_only else sampling(s, a)
            forced = teacher_forcing(s, a, compute)
        fbest = max(forced, key=lambda k: forced[k]["answer_tokens_per_s"])
        row = {"teacher_forced": {"by_batch_size": forced, "best_batch_size": int(fbest),
                                  "best_answer_tokens_per_s": forced[fbest]["answer_tokens_per_s"]}}
        if sampled:
            best = max(sampled, key=lambda k: sampled[k]["tokens_per_s"])
            row.update(sampling={"by_batch_size": sampled, "best_batch_size": int(best),
                                 "best_tokens_per_s": sampled[best]["tokens_per_s"]},
                       teacher_forced_over_sampling=round(forced[fbest]["answer_tokens_per_s"]
                                                          / sampled[best]["tokens_per_s"], 2))
        by_dtype[name] = row
    names = list(by_dtype)
    out = {**benchinfo.header(), "target": s.target.info.name, "device": str(s.engine.device), "engine": s.mode,
           "weights_dtype": a.dtype, "prompts_per_row": a.prompts_per_row, "max_new_tokens": a.max_new_tokens,
           "temperature": a.temperature, "max_seq_len": a.max_seq_len,
           "auto_choice": precision.for_model("auto", s.target.model).to_dict(), "by_compute_dtype": by_dtype}
    if len(names) > 1:
        first, last = by_dtype[names[0]], by_dtype[names[-1]]
        out["teacher_forcing_speedup"] = round(last["teacher_forced"]["best_answer_tokens_per_s"]
                                               / first["teacher_forced"]["best_answer_tokens_per_s"], 2)
        if "sampling" in first:
            out["sampling_speedup"] = round(last["sampling"]["best_tokens_per_s"]
                                            / first["sampling"]["best_tokens_per_s"], 2)
        out["bf16_vs_fp32"] = fidelity(s, a)
    benchinfo.write(out, a.out)


def sampling(s, a) -> dict:
    """New tokens/s of the batched sampler (koala.data.generate) by batch size."""
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
    return results


def _conversations(tok, n: int, max_seq_len: int, from_end: bool = False) -> list:
    recs = [r for r in P.sharegpt() if r.response]
    seqs = []
    for r in (reversed(recs) if from_end else recs):
        seq = tokenize(tok, r, max_seq_len)
        if seq is not None:
            seqs.append(seq)
        if len(seqs) >= n:
            break
    return seqs


def teacher_forcing(s, a, compute) -> dict:
    """Answer tokens/s of `koala.data.teacher.force_batch` over ShareGPT conversations that have answers."""
    tok = s.target.tokenizer
    seqs = sorted(_conversations(tok, a.forced, a.max_seq_len), key=lambda x: len(x[0]))  # as shards batch them
    force_batch(s.target.model, seqs[:2], 32, True, compute=compute)  # warm-up
    out = {}
    for bs in (int(x) for x in a.forced_batch_sizes.split(",")):
        t = time.perf_counter()
        for i in range(0, len(seqs), bs):
            force_batch(s.target.model, seqs[i:i + bs], 32, True, tok.pad_token_id or 0, compute)
        wall = time.perf_counter() - t
        answer = sum(len(ids) - p for ids, p in seqs)
        out[str(bs)] = {"conversations": len(seqs), "answer_tokens": answer, "all_tokens": sum(len(x) for x, _ in seqs),
                        "wall_s": round(wall, 3), "answer_tokens_per_s": round(answer / wall, 1)}
    return out


@torch.no_grad()
def fidelity(s, a) -> dict:
    """How far what bf16 teacher forcing stores is from the fp32 target's: over held-out conversations' answers,
    top-1 agreement, the largest |logit| difference, and the mean |log-prob| difference on the stored top-32."""
    model, tok = s.target.model, s.target.tokenizer
    agree = total = 0
    max_diff, lp_diff, feat_err = 0.0, [], []
    for ids, p in _conversations(tok, a.heldout, a.max_seq_len, from_end=True):
        x = torch.tensor([ids], device=model.device)
        h32 = model.model(input_ids=x).last_hidden_state[0, p - 1:len(ids) - 1]
        with torch.autocast(model.device.type, torch.bfloat16):
            h16 = model.model(input_ids=x).last_hidden_state[0, p - 1:len(ids) - 1]
            z16 = model.lm_head(h16).float()
        z32 = model.lm_head(h32).float()
        agree += int((z32.argmax(-1) == z16.argmax(-1)).sum())
        total += z32.shape[0]
        max_diff = max(max_diff, float((z32 - z16).abs().max()))
        l32, l16 = torch.log_softmax(z32, -1), torch.log_softmax(z16, -1)
        top = l32.topk(32, -1).indices
        lp_diff.append(float((l32.gather(-1, top) - l16.gather(-1, top)).abs().mean()))
        feat_err.append(float((h32 - h16.float()).norm() / h32.norm()))
    return {"conversations": a.heldout, "answer_positions": total, "top1_agreement": round(agree / total, 4),
            "max_abs_logit_diff": round(max_diff, 3), "mean_abs_top32_logprob_diff": round(sum(lp_diff) / len(lp_diff), 4),
            "feature_relative_error": round(sum(feat_err) / len(feat_err), 4)}


if __name__ == "__main__":
    main()
