"""Decoding speed of a target in koala's engine, eager and compiled, against Hugging Face generate; prints JSON.

    python bench/decode.py [--target smollm2-135m-instruct] [--device cpu|cuda] [--dtypes float32,bfloat16]
        [--prompts 2] [--drafter truncate:2 | ngram | lookup+DIR] [--gamma auto|N] [--threshold P]
        [--modes eager,compile] [--max-width 16] [--out bench/results/decode_dtypes.json]

For each weights dtype and mode (eager, compile) in one run: the target's forward cost by width (1..--max-width
tokens, what verifying gamma drafts or a tree costs), the compile time (apart from decoding), and tokens/s of koala's
autoregressive and speculative decoding (gamma chosen as `gamma: auto` chooses it); once per dtype, Hugging Face
`generate`. Each dtype is its own target: speculative decoding is lossless against the target in that dtype and mode.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koala.config import EvalConfig
from koala.evaluate import _hf_generate, load_bench
from koala.engine.calibrate import GAMMA_MAX, choose_from_probes, cost_curve, drafter_step_ms, parse_gamma
from koala.engine.compile import compile_seconds
from koala.engine.model import Transformer
from koala.engine.session import Session
from koala.targets import encode_chat, load_target
from koala import benchinfo
from koala.threads import configure_threads


def mode_run(s: Session, prompts, a) -> dict:
    """Cost curve, gamma, AR and speculative tokens/s for one session (eager or compiled)."""
    c0, t0 = compile_seconds(), time.perf_counter()
    s.reserve(max(len(p) for p in prompts) + a.max_new_tokens + GAMMA_MAX + 1)
    drafter = s.drafter(a.drafter)
    curve = cost_curve(s, max_width=a.max_width, refresh=True)["ms"]  # compiles (when compiled), measures each width
    g = parse_gamma(a.gamma)
    s.run(prompts[0], 16)  # warm-up (compiles, when compiled): never inside a timed or profiled run
    s.run(prompts[0], 16, drafter=drafter, gamma=g or GAMMA_MAX, threshold=a.threshold)
    probe = s.run(prompts[0], a.max_new_tokens, drafter=drafter, gamma=g or GAMMA_MAX, threshold=a.threshold,
                  profile=True)  # for auto: the acceptance by position at the longest draft, the drafter's cost
    choice = None
    if g is None:
        d_s = probe.draft_s / max(sum(m for m, _ in probe.rounds), 1)
        c = choose_from_probes({"ms": curve}, probe.rounds, d_s, GAMMA_MAX)
        g = c["chosen"]
        choice = {"probe_acceptance_by_position": [round(x, 3) for x in c["probe_acceptance_by_position"]],
                  "drafter_ms_per_draft": round(c["drafter_step_ms"], 3),
                  "expected_speedup": round(c["expected_speedup"], 3)}
    s.run(prompts[0], 16, drafter=drafter, gamma=g, threshold=a.threshold)
    setup = time.perf_counter() - t0
    ar, sp, taus = [], [], []
    for ids in prompts:
        r = s.run(ids, a.max_new_tokens)
        ar.append(len(r.tokens) / r.wall_s)
        r = s.run(ids, a.max_new_tokens, drafter=drafter, gamma=g, threshold=a.threshold)
        sp.append(len(r.tokens) / r.wall_s)
        taus.append(r.tau)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "compile_s": round(compile_seconds() - c0, 1), "setup_s": round(setup, 1),
        "target_forward_ms_by_width": {w: round(v, 2) for w, v in curve.items()},
        "verify_over_step": {w: round(v / curve[1], 3) for w, v in curve.items()},
        "drafter_step_ms": round(drafter_step_ms(s, drafter), 3),
        "gamma": g, "gamma_auto": choice,
        "tokens_per_s": {"autoregressive": round(mean(ar), 2), "speculative": round(mean(sp), 2)},
        "speedup": round(mean(sp) / mean(ar), 3), "tau": round(mean(taus), 3),
    }


def memory_floor(model) -> dict:
    """The weight bytes one decode step must read, this machine's read bandwidth, and the step time that implies.

    A one-token step of a float32 target reads every weight once, so no engine's step can be faster than
    bytes / bandwidth: the floor against which the compiled step is judged.
    """
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.ones(weight_bytes // 4, dtype=torch.float32)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    gbs = weight_bytes / sorted(ts)[3] / 1e9
    return {"weight_mb": round(weight_bytes / 1e6, 1), "read_bandwidth_gb_s": round(gbs, 2),
            "step_floor_ms": round(weight_bytes / (gbs * 1e9) * 1e3, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", "--dtype", default="float32", help="weights dtypes measured in turn (comma-separated)")
    ap.add_argument("--max-width", type=int, default=GAMMA_MAX + 1, help="widths 1..N of the cost curve")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--drafter", default="ngram")  # lookup+DIR measures what the smoke profile runs
    ap.add_argument("--gamma", default="auto")
    ap.add_argument("--threshold", type=float, default=None, help="draft only while the drafter is this confident")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    a = ap.parse_args()

    configure_threads()
    out = {**benchinfo.header(), "target": a.target, "device": a.device, "max_new_tokens": a.max_new_tokens,
           "prompts": a.prompts, "drafter": a.drafter, "threshold": a.threshold, "by_dtype": {}}
    for dtype in a.dtypes.split(","):
        out["by_dtype"][dtype] = one_dtype(a, dtype)
    benchinfo.write(out, a.out)


def one_dtype(a, dtype: str) -> dict:
    """Every mode's figures for the target loaded in `dtype`."""
    t = load_target(a.target, dtype=dtype, device=a.device)
    prompts = [encode_chat(t.tokenizer, list(r.messages)) for r in load_bench("mtbench", a.prompts)]
    out = {"memory": memory_floor(t.model) if a.device == "cpu" else None}
    base = Session(t, Transformer(t.model))
    _hf_generate(base, prompts[0], EvalConfig(max_new_tokens=8))  # warm-up
    hf = []
    for ids in prompts:
        n, w = _hf_generate(base, ids, EvalConfig(max_new_tokens=a.max_new_tokens))
        hf.append(n / w)
    out["hf_generate_tokens_per_s"] = round(sum(hf) / len(hf), 2)
    for mode in a.modes.split(","):
        s = Session(t, Transformer(t.model).compile() if mode == "compile" else Transformer(t.model))
        out[mode] = mode_run(s, prompts, a)
        out[mode]["ar_over_hf_generate"] = round(out[mode]["tokens_per_s"]["autoregressive"] /
                                                 out["hf_generate_tokens_per_s"], 3)
        print(json.dumps({dtype: {mode: out[mode]}}), flush=True)  # progress: each mode as it finishes
    return out


if __name__ == "__main__":
    main()
