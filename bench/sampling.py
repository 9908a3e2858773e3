"""Throughput of batched sampling from the default target (new tokens/s by batch size); prints JSON.

    python bench/sampling.py [--batch-sizes 1,4,16] [--device cpu|cuda] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koala.data import prompts as P
from koala.sampling import generate_batch
from koala.spec.sampling import SamplingParams
from koala.spec.session import Session
from koala.targets import encode_chat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    a = ap.parse_args()

    s = Session.open(a.target, dtype=a.dtype, device=a.device)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    recs = P.load("sharegpt", limit=max(sizes) * 4)
    prompts = [ids for ids in (encode_chat(s.target.tokenizer, list(r.messages)) for r in recs) if len(ids) <= 128]
    params = SamplingParams(a.temperature, 0.95)
    generate_batch(s.engine, prompts[:2], [0, 1], params, 8, s.eos_ids)  # warm-up
    results = {}
    for bs in sizes:
        batch = prompts[:bs]
        if s.engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate_batch(s.engine, batch, list(range(bs)), params, a.max_new_tokens, frozenset())  # no EOS stop
        if s.engine.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        new = sum(len(o.response_ids) for o in out)
        results[str(bs)] = {"new_tokens": new, "wall_s": round(wall, 3), "tokens_per_s": round(new / wall, 1),
                            "prompt_tokens": sum(len(p) for p in batch)}
    best = max(results, key=lambda k: results[k]["tokens_per_s"])
    print(json.dumps({"target": s.target.info.name, "device": str(s.engine.device), "dtype": a.dtype,
                      "threads": torch.get_num_threads(), "max_new_tokens": a.max_new_tokens,
                      "temperature": a.temperature, "by_batch_size": results, "best_batch_size": int(best),
                      "best_tokens_per_s": results[best]["tokens_per_s"]}, indent=2))


if __name__ == "__main__":
    main()
