"""What prompt lookup in front of a drafter gains from drafting its matches at a length of their own, and from leaving
one-token matches to the drafter: the target alone and `lookup+SPEC` variants, in one process, prompts interleaved.

    python bench/lookup_len.py --drafter heads:runs/default/drafter/heads/heads [--gamma 1] [--lengths 4,16]
                               [--bench mtbench:16,humaneval:8,sharegpt-heldout:8] [--reps 1] [--json OUT]

The drafter runs the shape `--gamma` gives (a chain's length or a DEPTHxTOPKxNODES tree) in every variant; the
variants differ only in prompt lookup (`koala.engine.drafters.LookupFirstDrafter`): matches of any size or of two
tokens or more (`min_ngram`), each filling the shape's verify slots or drafting `L` tokens whatever the shape
(`lookup_len`). Every variant decodes every prompt in turn (the order reversed every other prompt, so this
machine's drift weighs on all alike); each figure is decode time only (the prefill left out), summed over prompts
and repetitions. Greedy, the precision `eval.dtype: auto` picks, compiled steps. Prints JSON with the CPU model and
flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, help="a drafter spec (heads:PATH, ...); prompt lookup goes first")
    ap.add_argument("--gamma", default="1", help="the drafter's shape: a chain's length or DEPTHxTOPKxNODES")
    ap.add_argument("--lengths", default="4,16", help="lookup_len values measured (matches of two tokens or more)")
    ap.add_argument("--bench", default="mtbench:16,humaneval:8,sharegpt-heldout:8", help="BENCH:N,... prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    from interleave import interleaved, session_and_prompts

    from koala import benchinfo
    from koala.engine import drafters as D
    from koala.engine.calibrate import parse_draft
    from koala.engine.tree import TreeBudget

    s, prompts = session_and_prompts(a.bench)
    inner = s.drafter(a.drafter)
    shape = parse_draft(a.gamma)
    tree = shape if isinstance(shape, TreeBudget) else None
    gamma = tree.depth if tree else shape
    lengths = [int(x) for x in a.lengths.split(",")]
    room = max([gamma, *lengths] + ([tree.nodes, tree.drafter_slots] if tree else [])) + 2
    longest = max(len(p) for p in prompts) + a.max_new_tokens + room
    s.reserve(longest)
    inner.reset(longest)

    variants = {"target alone": None,
                "every match, filling the shape": D.LookupFirstDrafter(inner, min_ngram=1),
                "matches of 2+ tokens, filling the shape": D.LookupFirstDrafter(inner, min_ngram=2)}
    variants.update({f"matches of 2+ tokens, lookup {n}": D.LookupFirstDrafter(inner, min_ngram=2, lookup_len=n)
                     for n in lengths})

    def run(d, ids):
        return s.run(ids, a.max_new_tokens, drafter=d, gamma=gamma, tree=tree if d is not None else None)

    rows = interleaved(variants, prompts, run, a.reps)
    benchinfo.write({**benchinfo.header(), "drafter": inner.name, "shape": a.gamma, "dtype": s.target.info.dtype,
                     "mode": s.mode, "bench": a.bench, "max_new_tokens": a.max_new_tokens, "reps": a.reps,
                     "prompts": len(prompts), "variants": rows}, a.json)


if __name__ == "__main__":
    main()
