"""Decoding speed of the default target in koala's engine vs Hugging Face generate; prints JSON.

    python bench/decode.py [--target smollm2-135m-instruct] [--device cpu|cuda] [--dtype float32] [--prompts 2]
        [--drafter truncate:2 | lookup+DIR] [--gamma 4] [--threshold P]

Also prints the target's forward cost by width (1..5 tokens): what verifying gamma drafts costs on this device.
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
    ap.add_argument("--drafter", default="truncate:2")  # lookup+PATH measures what the smoke profile runs
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=None, help="draft only while the drafter is this confident")
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
    s.run(prompts[0], 16), s.run(prompts[0], 16, drafter=drafter, gamma=a.gamma, threshold=a.threshold)  # warm-up
    _hf_generate(s, prompts[0], EvalConfig(max_new_tokens=8))
    for ids in prompts:
        r = s.run(ids, a.max_new_tokens)
        rates["engine_autoregressive"].append(len(r.tokens) / r.wall_s)
        r = s.run(ids, a.max_new_tokens, drafter=drafter, gamma=a.gamma, threshold=a.threshold)
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
    inner = getattr(drafter, "drafter", drafter)  # the model behind lookup+
    with torch.no_grad():
        costs = {
            "target_step_ms": step_ms(lambda: eng(one, pos1, kv_len=kv), 20, dev),
            f"target_verify_{a.gamma + 1}_ms": step_ms(lambda: eng(many, posg, kv_len=kv), 20, dev),
        }
        if hasattr(inner, "model"):  # an independent drafter: one step, through its draft vocabulary if it has one
            dm, dv = inner.model, inner.draft_vocab
            dm.setup_caches(L + 256)
            step = (lambda: dm(one, pos1, kv_len=kv)) if dv is None else \
                (lambda: dv.logits(dm(one, pos1, kv_len=kv, head=False)[1]))
            costs["drafter_step_ms"] = step_ms(step, 20, dev)
        # Verify cost by width (1 = a plain step), interleaved so drift hits every width alike; medians.
        widths = {w: [] for w in range(1, 6)}
        for _ in range(40):
            for w, times in widths.items():
                ids, pos = torch.zeros(1, w, dtype=torch.long, device=dev), torch.arange(L, L + w, device=dev)
                t0 = time.perf_counter()
                eng(ids, pos, kv_len=None if kv is None else L + w)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        costs.update({f"target_forward_{w}_tokens_ms": sorted(t)[len(t) // 2] for w, t in widths.items()})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(json.dumps({
        "target": s.target.info.name, "device": str(dev), "dtype": a.dtype, "threads": torch.get_num_threads(),
        "max_new_tokens": a.max_new_tokens, "prompts": len(prompts), "drafter": a.drafter, "gamma": a.gamma,
        "threshold": a.threshold,
        "tokens_per_s": {k: round(mean(v), 2) for k, v in rates.items()},
        "tau": round(mean(taus), 3),
        **{k: round(v, 3) for k, v in costs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
