"""Decoding speed of a target in koala's engine, eager and compiled, chain against tree, against Hugging Face generate.

    python bench/decode.py [--target smollm2-135m-instruct] [--device cpu|cuda] [--dtypes float32,bfloat16]
        [--prompts 8] [--drafter heads:DIR | truncate:2 | ngram | lookup+SPEC] [--threshold P]
        [--modes eager,compile] [--trees 6x10x60] [--out bench/results/decode.json]

For each weights dtype and mode (eager, compile) in one run: the target's forward cost by width (1 token up to the
widest tree `auto` considers), the compile time (apart from decoding), the draft shapes `gamma: auto` ranks (chains
and trees, expected tokens per round and per second) and its choice, then on the same prompts, interleaved, tokens/s
and tau of koala's autoregressive decoding, the best chain and the best tree of that ranking, and of fixed tree
shapes (`--trees`, default EAGLE-2's own 6 levels x top-10, 60 nodes: wider than `auto` probes). Once per dtype,
Hugging Face `generate`. Each dtype is its own target: speculative decoding is lossless against the target in that
dtype and mode (checked here: every chain and tree output equals the autoregressive one).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koala.config import EvalConfig
from koala.evaluate import _hf_generate, _warm_up_and_choose_gamma, load_bench
from koala.engine.calibrate import GAMMA_MAX
from koala.engine.compile import compile_seconds
from koala.engine.model import Transformer
from koala.engine.session import Session
from koala.engine.tree import TreeBudget, parse_tree
from koala.targets import encode_chat, load_target
from koala import benchinfo
from koala.threads import configure_threads


def mode_run(s: Session, prompts, a) -> dict:
    """Cost curve, the ranked draft shapes, AR / best chain / best tree tokens/s for one session (eager or compiled)."""
    c0, t0 = compile_seconds(), time.perf_counter()
    cfg = EvalConfig(max_new_tokens=a.max_new_tokens, gamma="auto", threshold=a.threshold, warmup=1)
    drafter = s.drafter(a.drafter)
    s.reserve(max(len(p) for p in prompts) + a.max_new_tokens + 64)
    drafter.reset(s.engine.max_seq_len)
    gmax = min(GAMMA_MAX, getattr(drafter, "max_gamma", None) or GAMMA_MAX)
    cal = _warm_up_and_choose_gamma(s, drafter, [(None, p) for p in prompts], cfg, gmax,
                                    lambda msg: print(f"[{msg}]", flush=True))
    ch = cal["choice"]
    table = ch["shapes"]
    best = lambda ks: max((k for k in table if k != "0x0" and ks(int(k.split("x")[1]))),  # noqa: E731
                          key=lambda k: table[k]["rate"])
    shapes = {"chain": best(lambda k: k == 1), "tree": best(lambda k: k > 1)}
    plans = {}
    for name, shape in shapes.items():
        d, k = (int(x) for x in shape.split("x"))
        plans[name] = (d, TreeBudget(d, k, d * k) if k > 1 else None)
    for shape in filter(None, a.trees.split(",")):  # fixed shapes measured beside them (EAGLE-2's own size)
        t = parse_tree(shape)
        plans[str(t)] = (t.depth, t)
    for d, tree in plans.values():
        s.run(prompts[0], 16, drafter=drafter, gamma=d, tree=tree, threshold=a.threshold)  # warm
    setup = time.perf_counter() - t0
    tokens = {n: 0 for n in ("ar", *plans)}
    wall, forwards, lossless = dict.fromkeys(tokens, 0.0), dict.fromkeys(tokens, 0), dict.fromkeys(plans, 0)
    for ids in prompts:  # interleaved, so drift hits all alike
        ar = s.run(ids, a.max_new_tokens)
        tokens["ar"] += len(ar.tokens)
        wall["ar"] += ar.wall_s
        for name, (d, tree) in plans.items():
            r = s.run(ids, a.max_new_tokens, drafter=drafter, gamma=d, tree=tree, threshold=a.threshold)
            tokens[name] += len(r.tokens)
            wall[name] += r.wall_s
            forwards[name] += r.target_forwards
            lossless[name] += r.tokens == ar.tokens
    tps = {n: tokens[n] / wall[n] for n in tokens}
    out = {
        "compile_s": round(compile_seconds() - c0, 1), "setup_s": round(setup, 1),
        "target_forward_ms_by_width": {w: round(v, 2) for w, v in ch["cost_by_width_ms"].items()},
        "verify_over_step": {w: round(v / ch["cost_by_width_ms"][1], 3) for w, v in ch["cost_by_width_ms"].items()},
        "draft_ms_per_level_by_topk": {k: round(v, 3) for k, v in ch["draft_ms_per_depth"].items()},
        "auto": {"chosen": ch["chosen"], "expected_speedup": round(ch["expected_speedup"], 3),
                 "shapes": {k: {m: round(x, 3) for m, x in v.items()} for k, v in table.items()}},
        "tokens_per_s": {"autoregressive": round(tps["ar"], 2)},
    }
    out["fixed"] = {}
    for name, (d, tree) in plans.items():
        r = {"shape": str(tree) if tree else d, "tau": round(tokens[name] / forwards[name], 3),
             "tokens_per_s": round(tps[name], 2), "speedup": round(tps[name] / tps["ar"], 3),
             "lossless": f"{lossless[name]}/{len(prompts)}"}
        if name in shapes:
            out[name] = {**r, "expected_speedup": round(table[shapes[name]]["rate"] / table["0x0"]["rate"], 3)}
        else:
            out["fixed"][name] = {**r, "tau_over_chain": round(r["tau"] * forwards["chain"] / tokens["chain"], 3)}
    out["tree_over_chain_tau"] = round(out["tree"]["tau"] / out["chain"]["tau"], 3)
    return out


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
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--drafter", default="ngram")  # lookup+DIR measures what the smoke profile runs
    ap.add_argument("--threshold", type=float, default=None, help="draft only while the drafter is this confident")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--trees", default="6x10x60", help="fixed tree shapes also measured (default: EAGLE-2's size)")
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
