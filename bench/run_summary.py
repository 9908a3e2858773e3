"""A finished `koala run` as a results file: its evaluations, its drafter's held-out agreement by draft, its wall time.

    time koala run --profile default > runs/default.log 2>&1
    python bench/run_summary.py runs/default --log runs/default.log --commit COMMIT \
        --out bench/results/default_profile.json

`--commit` names the commit the run ran (this script may run later, from another one).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from koala import benchinfo


def evaluation(report: Path) -> dict:
    r = json.loads(report.read_text())
    lossless = r["lossless"]  # {identical, total, near_ties, differences}
    return {"bench": r["bench"], "prompts": r["prompts"], "drafter": r["drafter"], "mode": r["mode"],
            "dtype": r["dtype"], "max_new_tokens": r["max_new_tokens"], "gamma": r["gamma"],
            "tau": round(r["tau"], 3), "speedup": round(r["speedup"], 3),
            "tokens_per_s": {k: None if v is None else round(v, 2) for k, v in r["tokens_per_s"].items()},
            "acceptance_by_position": [round(a, 3) for a in r["acceptance_by_position"]],
            "lossless": f"{lossless['identical']}/{lossless['total']}", "near_ties": len(lossless["near_ties"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--log", required=True, help="the run's output, with `time`'s real line at the end")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--command", default="koala run --profile default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Path(a.run_dir)
    log = Path(a.log).read_text(errors="replace")
    real = re.findall(r"real\s+(\d+)m([\d.]+)s", log)
    heads = sorted(run.glob("drafter/*/heads/heads.json"))
    stages = {}
    for h in heads:
        info = json.loads(h.read_text())
        m = info["metrics"]
        stages[h.parent.parent.name] = {
            "steps": info["training"]["steps"], "data": info.get("data_dir"),
            "heldout_greedy_agreement_by_draft": [round(m[k], 4) for k in sorted(m)
                                                  if k.startswith("heldout_greedy_agreement_pos")]}
    header = benchinfo.header()
    out = {**header, "command": a.command, "commit": a.commit,
           "wall_s": round(int(real[-1][0]) * 60 + float(real[-1][1]), 1) if real else None,
           "stages": stages,
           "evaluations": {p.parent.name: evaluation(p) for p in sorted(run.glob("eval/*/report.json"))}}
    benchinfo.write(out, a.out)


if __name__ == "__main__":
    main()
