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
from koala.report import EvalReport


def evaluation(report: Path) -> dict:
    r = EvalReport.load(report)
    return {"bench": r.bench, "prompts": r.prompts, "drafter": r.drafter, "mode": r.mode, "dtype": r.dtype,
            "max_new_tokens": r.max_new_tokens, "gamma": r.gamma, "lookup_len": r.gamma_choice.get("lookup_len"),
            "tau": round(r.tau, 3), "speedup": round(r.speedup, 3),
            "tokens_per_s": {k: None if v is None else round(v, 2) for k, v in r.tokens_per_s.model_dump().items()},
            "acceptance_by_position": [round(a, 3) for a in r.acceptance_by_position], "tree": r.tree,
            "speedup_ci95": [round(x, 3) for x in r.speedup_ci95] if r.speedup_ci95 else None,
            "compile_s": round(r.compile_s, 1), "setup_s": round(r.setup_s, 1), "lossless": r.lossless.text,
            "near_ties": len(r.lossless.near_ties)}


# Prefect names a task run after its task plus a 3-hex suffix, or by the task's own `task_run_name` (train-heads)
LOG_LINE = re.compile(r"(\d\d):(\d\d):(\d\d\.\d+) \| \w+\s+\| Task run '([\w.-]+?)(?:-([0-9a-f]{3}))?'")


def stage_wall_s(log: str) -> dict:
    """Seconds per task of the pipeline, from the first to the last line each task run logged (Prefect's own log
    lines: `Finished in state` is each run's last), summed over the runs of one task."""
    spans: dict[tuple, list[float]] = {}
    for m in LOG_LINE.finditer(log):
        h, mi, sec, task, run = m.groups()  # a task's runs are told apart by Prefect's suffix
        spans.setdefault((task, run), []).append(int(h) * 3600 + int(mi) * 60 + float(sec))
    out: dict[str, float] = {}
    for (task, _), ts in spans.items():
        d = max(ts) - min(ts)
        out[task] = round(out.get(task, 0.0) + (d if d >= 0 else d + 86400), 1)
    return out


def pipeline_summary(log: str) -> dict | None:
    """The pipeline's own summary line (`pipeline summary: {...}`), as the flow logged it."""
    import ast

    m = re.search(r"pipeline summary: (\{.*\})\s*$", log, re.M)
    return None if not m else ast.literal_eval(m.group(1))


def wall_s(log: str) -> float | None:
    """The run's wall time: the shell's `time` (`real 74m43.1s`) or GNU time's `-f "wall %e s"`, the last one."""
    found = [int(m) * 60 + float(s) if m else float(w)
             for m, s, w in re.findall(r"^(?:real\s+(\d+)m([\d.]+)s|wall ([\d.]+) s)\s*$", log, re.M)]
    return round(found[-1], 1) if found else None


def run_figures(log: str) -> dict:
    """What one run's log says: wall time, the candidate's headline figures, compile time, the promotion decision."""
    s = pipeline_summary(log) or {}
    compile_s = re.search(r"compile (\d+) s", s.get("engine", ""))
    return {"wall_s": wall_s(log),
            "tau": round(s["tau"], 3) if "tau" in s else None,
            "speedup": round(s["speedup"], 3) if "speedup" in s else None,
            "speedup_ci95": [round(x, 3) for x in s.get("speedup_ci95") or []] or None,
            "tokens_per_s": {k: round(v, 1) for k, v in s.get("tokens_per_s", {}).items() if v is not None},
            "lossless": s.get("lossless"), "engine": s.get("engine"),
            "compile_s": int(compile_s.group(1)) if compile_s else None,
            "promoted": s.get("promoted"), "reason": s.get("reason"), "stage_wall_s": stage_wall_s(log)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--log", required=True, help="the run's output, with `time`'s real line (or GNU time's "
                    "`wall %%e s`) at the end")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--command", default="koala run --profile default")
    ap.add_argument("--out", default=None)
    ap.add_argument("--before", default=None, help="the log of an earlier run of the same command (e.g. the first "
                    "`make demo` on an empty cache, when this is the second): its figures go under `first_run`")
    a = ap.parse_args()
    run = Path(a.run_dir)
    log = Path(a.log).read_text(errors="replace")
    heads = sorted(run.glob("drafter/*/heads/heads.json"))
    stages = {}
    for h in heads:
        info = json.loads(h.read_text())
        m = info["metrics"]
        stages[h.parent.parent.name] = {
            "steps": m.get("steps_run", info["training"]["steps"]), "steps_asked": info["training"]["steps"],
            "data": info.get("data_dir"),
            "heldout_greedy_agreement_by_draft": [round(m[k], 4) for k in sorted(m)
                                                  if k.startswith("heldout_greedy_agreement_pos")]}
    header = benchinfo.header()
    out = {**header, "command": a.command, "commit": a.commit,
           "wall_s": wall_s(log),
           "stages": stages, "run": run_figures(log),
           "first_run": run_figures(Path(a.before).read_text(errors="replace")) if a.before else None,
           "evaluations": {p.parent.name: evaluation(p) for p in sorted(run.glob("eval/*/report.json"))}}
    benchinfo.write(out, a.out)


if __name__ == "__main__":
    main()
