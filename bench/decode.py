"""Decoding speed of the default target in koala's engine vs Hugging Face generate; prints JSON.

    python bench/decode.py [--target smollm2-135m-instruct] [--device cpu|cuda] [--dtype float32] [--prompts 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koala.config import EvalConfig
from koala.evaluate import _hf_generate, load_bench
from koala.spec.session import Session
from koala.targets import encode_chat


def step_ms(fn, reps: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--drafter", default="truncate:2")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    a = ap.parse_args()

    s = Session.open(a.target, dtype=a.dtype, device=a.device)
    dev = s.engine.device
    cfg = EvalConfig(max_new_tokens=a.max_new_tokens, gamma=a.gamma)
    prompts = [encode_chat(s.target.tokenizer, list(r.messages)) for r in load_bench("mtbench", a.prompts)]
    drafter = s.drafter(a.drafter)
    rates = {"engine_autoregressive": [], "engine_speculative": [], "hf_generate": []}
    taus = []
    s.run(prompts[0], 16), s.run(prompts[0], 16, drafter=drafter, gamma=a.gamma)  # warm-up
    _hf_generate(s, prompts[0], EvalConfig(max_new_tokens=8))
    for ids in prompts:
        r = s.run(ids, a.max_new_tokens)
        rates["engine_autoregressive"].append(len(r.tokens) / r.wall_s)
        r = s.run(ids, a.max_new_tokens, drafter=drafter, gamma=a.gamma)
        rates["engine_speculative"].append(len(r.tokens) / r.wall_s)
        taus.append(r.tau)
        n, w = _hf_generate(s, ids, cfg)
        rates["hf_generate"].append(n / w)

    # Step costs at a typical position (prompt + 64 tokens in the cache).
    L = len(prompts[0]) + 64
    eng = s.engine
    eng.setup_caches(L + 256)
    kv = None if dev.type == "cuda" else L + a.gamma + 1
    one = torch.zeros(1, 1, dtype=torch.long, device=dev)
    many = torch.zeros(1, a.gamma + 1, dtype=torch.long, device=dev)
    pos1 = torch.tensor([L], device=dev)
    posg = torch.arange(L, L + a.gamma + 1, device=dev)
    dm = drafter.model
    dm.setup_caches(L + 256)
    with torch.no_grad():
        costs = {
            "target_step_ms": step_ms(lambda: eng(one, pos1, kv_len=kv), 20, dev),
            f"target_verify_{a.gamma + 1}_ms": step_ms(lambda: eng(many, posg, kv_len=kv), 20, dev),
            "drafter_step_ms": step_ms(lambda: dm(one, pos1, kv_len=kv), 20, dev),
        }
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(json.dumps({
        "target": s.target.info.name, "device": str(dev), "dtype": a.dtype, "threads": torch.get_num_threads(),
        "max_new_tokens": a.max_new_tokens, "prompts": len(prompts), "drafter": a.drafter, "gamma": a.gamma,
        "tokens_per_s": {k: round(mean(v), 2) for k, v in rates.items()},
        "tau": round(mean(taus), 3),
        **{k: round(v, 3) for k, v in costs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
