"""Where a speculative round's time goes, against a plain step: drafting, the target's verify forward, and the rest
(acceptance, cache moves, bookkeeping), per round, by draft shape, in the compiled engine.

    python bench/round_cost.py [--drafter heads:runs/smoke/drafter/heads/heads] [--bench mtbench] [--limit 8]
                               [--dtype bfloat16] [--shapes 3,1x3x3,2x4x8] [--max-new-tokens 96] [--json OUT]

Every shape is decoded over the same prompts, in turn prompt by prompt (prompt lookup in front of the drafter, as
the profiles run it), the target alone among them. A round costs `round / step` plain steps and yields tau tokens,
so the speed-up over the target alone is about tau divided by that ratio: this shows which of the two limits a
drafter on this CPU. Prints JSON with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decode(session, drafter, ids: list[int], max_new_tokens: int, shape, profile: bool = False):
    """One generation with `shape`: None (the target alone), an int (a chain of that many drafts) or a TreeBudget."""
    return session.run(ids, max_new_tokens, drafter=None if shape is None else drafter,
                       gamma=shape if isinstance(shape, int) else 1,
                       tree=None if shape is None or isinstance(shape, int) else shape, profile=profile)


def measure(session, drafter, prompts: list[list[int]], max_new_tokens: int, shapes: dict) -> dict:
    """Decode every prompt with each shape in turn, profiled; shapes interleaved prompt by prompt, so this machine's
    drift between minutes weighs on all alike."""
    sums = {name: dict(wall=0.0, draft=0.0, verify=0.0, tokens=0, rounds=0) for name in shapes}
    for ids in prompts:
        for name, shape in shapes.items():
            r = decode(session, drafter, ids, max_new_tokens, shape, profile=True)
            t = sums[name]
            t["wall"] += r.wall_s - r.prefill_s  # decoding only: the prefill is the same for every shape
            t["draft"], t["verify"] = t["draft"] + r.draft_s, t["verify"] + r.verify_s
            t["tokens"], t["rounds"] = t["tokens"] + len(r.tokens) - 1, t["rounds"] + r.target_forwards - 1
    out = {}
    for name, t in sums.items():
        ms = lambda s: round(1e3 * s / max(t["rounds"], 1), 3)  # noqa: E731
        out[name] = {"tokens_per_s": round(t["tokens"] / t["wall"], 2),
                     "tau": round(t["tokens"] / max(t["rounds"], 1), 3),
                     "ms_per_round": {"draft": ms(t["draft"]), "verify": ms(t["verify"]),
                                      "rest": ms(t["wall"] - t["draft"] - t["verify"]), "total": ms(t["wall"])}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="heads:runs/smoke/drafter/heads/heads")
    ap.add_argument("--bench", default="mtbench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default="3,1x3x3,2x4x8", help="chains (gamma) and trees (DEPTHxTOPKxNODES)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from koala import benchinfo
    from koala.engine.drafters import LookupFirstDrafter
    from koala.engine.session import Session
    from koala.evaluate import load_bench
    from koala.engine.tree import parse_tree
    from koala.targets import encode_chat

    s = Session.open("smollm2-135m-instruct", dtype=a.dtype, compile=True)
    drafter = LookupFirstDrafter(s.drafter(a.drafter))
    prompts = [encode_chat(s.target.tokenizer, list(r.messages)) for r in load_bench(a.bench, a.limit)]
    shapes = {"target alone": None, **{x: int(x) if x.isdigit() else parse_tree(x) for x in a.shapes.split(",")}}
    drafts = max(x if isinstance(x, int) else max(x.nodes, x.drafter_slots) for x in shapes.values() if x)
    room = max(len(p) for p in prompts) + a.max_new_tokens + drafts + 1  # one cache size for every shape
    s.reserve(room)
    drafter.reset(room)
    for shape in shapes.values():  # every step built or loaded, and warm, before anything is timed
        decode(s, drafter, prompts[0], 16, shape)
    out = measure(s, drafter, prompts, a.max_new_tokens, shapes)
    step = out["target alone"]["ms_per_round"]["total"]
    for name, r in out.items():
        r["round_over_step"] = round(r["ms_per_round"]["total"] / step, 3)
        r["speedup"] = round(r["tokens_per_s"] / out["target alone"]["tokens_per_s"], 3)
        print(f"{name:>12}: tau {r['tau']:.2f}, {r['tokens_per_s']:.1f} tokens/s, round {r['ms_per_round']}, "
              f"{r['round_over_step']:.2f} steps, {r['speedup']:.2f}x", file=sys.stderr)
    benchinfo.write({**benchinfo.header(), "engine": s.describe(), "drafter": drafter.name, "bench": a.bench,
                     "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "shapes": out}, a.json)


if __name__ == "__main__":
    main()
