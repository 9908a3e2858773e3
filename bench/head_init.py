"""How an EAGLE head's start decides what a short training reaches: the feature pass-through start against a plain
random one, several seeds each, trained by koala's own recipe (`train_heads`); prints JSON.

    python bench/head_init.py [--profile smoke] [--data runs/smoke/teacher] [--steps 100] [--seeds 0,1]
        [--out runs/head_init] [--json bench/results/head_init.json]

The pass-through start (`koala.models.heads._feature_passthrough`, what every new EAGLE head gets) sets the fc layer
to the identity on the target's feature plus a tenth of its random weights; the random start is the same head with
that step skipped. Both read the same data, seed by seed, and are measured on the data's held-out rows: greedy agreement
with the target by draft position (drafts 2 and 3 on the head's own predicted features, as it drafts), each head
trained three drafts deep for exactly --steps. The two starts cost the same per step. Finished runs are kept under
OUT, by settings: the same command goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STARTS = ("passthrough", "random")


def run_one(session, start: str, seed: int, a) -> dict:
    from koala.config import load_config
    from koala.models import heads
    from koala.training.recipes import train_heads

    cfg = load_config(a.profile, overrides=["drafter.kind=eagle", f"training.seed={seed}", "training.unroll=3",
                                            f"training.steps={a.steps}", "training.max_minutes=null",
                                            "training.eval_every=1000000"])
    out = Path(a.out) / f"{a.profile}-{Path(a.data).name}-{a.steps}" / start / f"seed{seed}"
    keep = heads._feature_passthrough
    if start == "random":
        heads._feature_passthrough = lambda fc, C: None
    t0 = time.perf_counter()
    try:
        path = train_heads(cfg, session.target, a.data, out, resume="auto", progress=False)
    finally:
        heads._feature_passthrough = keep
    metrics = json.loads((path / "heads.json").read_text())["metrics"]
    return {"start": start, "seed": seed, "train_s": round(time.perf_counter() - t0, 1),
            **{k: round(v, 4) for k, v in metrics.items() if k.startswith("heldout_") or k == "loss"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", default="runs/smoke/teacher", help="teacher-forced or sampled shards")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="runs/head_init")
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args()
    from koala import benchinfo
    from koala.config import load_config
    from koala.engine.session import Session

    if not (Path(a.data) / "manifest.json").exists():
        sys.exit(f"--data {a.data}: no shards there: run `koala run --profile {a.profile}` first (it writes "
                 f"runs/{a.profile}/teacher), or `koala sample` and pass its --out as --data")
    log = benchinfo.RunLog(a.out, {"profile": a.profile, "data": a.data, "steps": a.steps},
                           key=lambda r: (r["start"], r["seed"]))
    done = log.done
    tc = load_config(a.profile).target
    session = Session.open(tc.spec, dtype=tc.dtype, device=tc.device)
    seeds = [int(s) for s in a.seeds.split(",")]
    for seed in seeds:  # the two starts of one seed side by side: a stop leaves pairs, not one start's seeds
        for start in STARTS:
            if (start, seed) in done:
                continue
            r = run_one(session, start, seed, a)
            if "heldout_greedy_agreement_pos1" not in r:
                sys.exit(f"--data {a.data}: no held-out rows to measure on: use a larger set")
            log.add(r)
    summary = {}
    for start in STARTS:
        runs = [done[(start, s)] for s in seeds]
        summary[start] = {k: {"mean": round(statistics.mean(r[k] for r in runs), 4),
                              "std": round(statistics.stdev(r[k] for r in runs), 4) if len(runs) > 1 else 0.0}
                          for k in runs[0] if k.startswith("heldout_greedy") or k == "train_s"}
    benchinfo.write({**benchinfo.header(), "profile": a.profile, "data": a.data, "steps": a.steps, "seeds": seeds,
                     "summary": summary, "runs": [done[(st, s)] for s in seeds for st in STARTS]}, a.json)


if __name__ == "__main__":
    main()
