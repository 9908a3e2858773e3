"""How far prompt lookup's drafts agree with the target, by the size of the n-gram matched: offline, from a run's
greedy samples (each prompt with the target's own answer), no model run.

    python bench/lookup_depth.py runs/smoke/data [--depth 12] [--json OUT]

At every answer position it applies the engine's lookup rule (`koala.engine.drafters.PromptLookupDrafter`: the
latest earlier match of the last 3, 2 or 1 tokens) to the text before it and counts how many of the next `--depth`
copied tokens equal the target's answer: the accepted length a lookup round with that many drafts would have had.
Copied text goes on agreeing past a drafter's depth, which is why a lookup round fills a draft tree's every verify
slot rather than its depth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a sampling stage's output folder (Parquet shards of greedy samples)")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args()
    import pyarrow.parquet as pq

    from koala import benchinfo
    from koala.engine.drafters import PromptLookupDrafter

    shards = sorted(Path(a.data).glob("*.parquet"))
    if not shards:
        raise SystemExit(f"{a.data}: no Parquet shards: give a sampling stage's output folder (sampling.out_dir)")
    rows = [r for f in shards for r in pq.read_table(f, columns=["input_ids", "prompt_len", "temperature"]).to_pylist()
            if r["temperature"] == 0.0]
    lookup = PromptLookupDrafter(3)
    by_size: dict[int, list[int]] = {}  # n-gram size (0: no match) -> accepted lengths
    for r in rows:
        ids = r["input_ids"]
        for n in range(r["prompt_len"] + 1, len(ids)):
            size, draft = lookup.match(ids[:n], a.depth)
            k = 0
            while k < len(draft) and n + k < len(ids) and draft[k] == ids[n + k]:
                k += 1
            by_size.setdefault(size, []).append(k)
    total = sum(len(v) for v in by_size.values())
    table = {}
    for size in sorted(by_size):
        ks = by_size[size]
        table[size] = {"share_of_positions": round(len(ks) / total, 4), "mean_accepted": round(sum(ks) / len(ks), 3),
                       "accepted_at_least": {d: round(sum(k >= d for k in ks) / len(ks), 3)
                                             for d in range(1, a.depth + 1)}}
    benchinfo.write({**benchinfo.header(), "data": str(a.data), "answers": len(rows), "positions": total,
                     "depth": a.depth, "by_ngram": table}, a.json)


if __name__ == "__main__":
    main()
