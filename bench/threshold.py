"""What a confidence threshold buys a drafting chain, and what proposing the first draft whatever its probability
buys it: the target alone and speculative chains at each threshold, in one process, prompts interleaved.

    python bench/threshold.py --drafter heads:runs/smoke/drafter/heads/heads [--gammas 1,3] [--thresholds 0.3,0.5]
                              [--bench mtbench:12,sharegpt-heldout:12] [--reps 2] [--json OUT]

For each chain length: plain decoding, the chain with no threshold, and with each threshold under both rules for
the first draft (`koala.engine.drafters.FIRST_DRAFT_FREE`: proposed whatever its probability, or dropped like any
other when unconfident). Prompt lookup goes first, as the profiles evaluate. Every variant decodes every prompt
in turn (the order reversed every other prompt, so this machine's drift weighs on all alike); each figure is
decode time only (the prefill left out), summed over prompts and repetitions. Greedy, the precision `eval.dtype:
auto` picks, compiled steps. Prints JSON with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, help="a drafter spec (heads:PATH, ...); prompt lookup goes first")
    ap.add_argument("--gammas", default="1,3")
    ap.add_argument("--thresholds", default="0.3,0.5")
    ap.add_argument("--bench", default="mtbench:12,sharegpt-heldout:12", help="BENCH:N,... prompts from each")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    from interleave import interleaved, session_and_prompts

    from koala import benchinfo
    from koala.engine import drafters as D

    s, prompts = session_and_prompts(a.bench)
    drafter = s.drafter(a.drafter)
    if not isinstance(drafter, (D.PromptLookupDrafter, D.LookupFirstDrafter)):
        drafter = D.LookupFirstDrafter(drafter)
    longest = max(len(p) for p in prompts) + a.max_new_tokens + max(int(g) for g in a.gammas.split(",")) + 1
    s.reserve(longest)
    drafter.reset(longest)

    variants = {"target alone": None}
    for g in (int(x) for x in a.gammas.split(",")):
        variants[f"chain {g}, no threshold"] = (g, None, True)
        for t in (float(x) for x in a.thresholds.split(",")):
            for free in (True, False):
                variants[f"chain {g}, threshold {t}, first draft {'always' if free else 'thresholded'}"] = (g, t, free)

    def run(v, ids):
        if v is None:
            return s.run(ids, a.max_new_tokens)
        g, t, free = v
        D.FIRST_DRAFT_FREE = free
        return s.run(ids, a.max_new_tokens, drafter=drafter, gamma=g, threshold=t)

    rule = D.FIRST_DRAFT_FREE
    try:
        rows = interleaved(variants, prompts, run, a.reps)
    finally:
        D.FIRST_DRAFT_FREE = rule
    benchinfo.write({**benchinfo.header(), "drafter": drafter.name, "lookup": True, "dtype": s.target.info.dtype,
                     "mode": s.mode, "bench": a.bench, "max_new_tokens": a.max_new_tokens, "reps": a.reps,
                     "prompts": len(prompts), "variants": rows}, a.json)


if __name__ == "__main__":
    main()
