"""The ablation that can tell the methods apart: losses and heads, several seeds each; prints mean +- std as JSON.

    python bench/ablation.py [--grid losses|heads|eagle3|all] [--seeds 0,1,2] [--steps 150] [--profile default]
        [--data runs/default/teacher] [--bench mtbench:80,humaneval:40] [--out runs/ablation] [--only TEXT]
        [--steps-of KIND=N ...] [--json bench/results/NAME.json] [--markdown]

Each run trains one configuration with one seed through koala's own recipes (`distill` for the independent drafter,
`train_heads` for Medusa and EAGLE heads) on one dataset (by default the default profile's teacher-forced set), then
measures it: the held-out expected acceptance (the lower bound of a top-k teacher, exact from features), greedy
agreement, and tau and speed-up on each benchmark (greedy, gamma fixed for every configuration, compiled engine, the
output checked identical to the target's). Runs append to OUT/runs.jsonl as they finish, and a finished
(configuration, seed) is never run again: stop it any time and run the same command to go on. A run killed midway
resumes from its checkpoints. The summary groups the runs by configuration: mean +- std over seeds.

Grids:
  losses: the independent drafter distilled with each loss (fkl, rkl, tvd, tvdpp, tvdpp_exact, jsd)
  heads:  Medusa and EAGLE heads with K = 1, 2, 3, adversarial off / on, plus the independent drafter (fkl) with
          and without the adversarial term (without it, it is the losses grid's fkl run, shared, never run twice)
  eagle3: EAGLE-1 against EAGLE-3 heads (K = 1, the profile's training-time-test depth); `--steps-of eagle3=N`
          gives EAGLE-3 the steps that take the wall time of EAGLE-1's `--steps` (measure both with bench/train.py)
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

GAMMA = 3  # one draft length for every configuration: tau and speed-up compare drafters, not gamma choices


def grid(name: str) -> dict[str, list[str]]:
    """Configuration name -> overrides (section.field=value) of the profile."""
    from koala.config import LOSS_NAMES

    out: dict[str, list[str]] = {}
    if name in ("losses", "all"):
        for loss in LOSS_NAMES:
            out[f"independent loss={loss}"] = ["drafter.kind=draft_model", f"training.loss={loss}"]
    if name in ("heads", "all"):
        for kind in ("medusa", "eagle"):
            for k in (1, 2, 3):
                for adv in (False, True):
                    out[f"{kind} K={k}{' adversarial' if adv else ''}"] = [
                        f"drafter.kind={kind}", f"drafter.layers={k}", f"training.adversarial={str(adv).lower()}"]
        # The plain independent drafter is the losses grid's fkl run (same overrides, same name): its runs count
        # in both grids and are never trained twice.
        out["independent loss=fkl"] = ["drafter.kind=draft_model", "training.loss=fkl"]
        out["independent loss=fkl adversarial"] = ["drafter.kind=draft_model", "training.loss=fkl",
                                                   "training.adversarial=true"]
    if name == "eagle3":
        for kind in ("eagle", "eagle3"):
            out[f"{kind} K=1"] = [f"drafter.kind={kind}", "drafter.layers=1"]
    return out


def run_one(session, name: str, overrides: list[str], seed: int, a) -> dict:
    """Train one configuration with one seed, then measure it."""
    from koala.config import EvalConfig, HEAD_KINDS, load_config, parse_bench
    from koala.evaluate import evaluate
    from koala.training.recipes import distill, train_heads

    kind = next((o.split("=", 1)[1] for o in overrides if o.startswith("drafter.kind=")), None)
    steps = dict(s.split("=") for s in a.steps_of).get(kind, a.steps)
    cfg = load_config(a.profile, overrides=[*overrides, f"training.seed={seed}", f"training.steps={steps}",
                                            "training.eval_every=1000000"])
    out = Path(a.out) / "runs" / name.replace(" ", "_").replace("=", "-") / f"seed{seed}"
    t0 = time.perf_counter()
    if cfg.drafter.kind in HEAD_KINDS:
        path = train_heads(cfg, session.target, a.data, out, resume="auto", progress=False)
        spec, info = f"heads:{path}", json.loads((path / "heads.json").read_text())
    else:
        path = distill(cfg, session.target, a.data, out, resume="auto", progress=False)
        spec, info = str(path), json.loads((path / "koala.json").read_text())
    row = {"config": name, "seed": seed, **budget(a), "config_steps": int(steps),
           "train_s": round(time.perf_counter() - t0, 1),
           **{k: v for k, v in info["metrics"].items() if k.startswith("heldout") and ("_pos" not in k or
                                                                                      a.grid == "eagle3")}}
    for bench in a.bench.split(","):
        b, limit = parse_bench(bench)
        r = evaluate(session, spec, EvalConfig(bench=b, limit=limit, gamma=GAMMA, max_new_tokens=a.max_new_tokens,
                                               warmup=0, compile=True))
        key = Path(b.removeprefix("hf:")).stem
        row.update({f"tau_{key}": r.tau, f"speedup_{key}": r.speedup, f"lossless_{key}": r.lossless.text})
    return row


def budget(a) -> dict:
    """What makes runs comparable: a finished run counts as done only under the same budget."""
    return {"steps": a.steps, "profile": a.profile, "data": a.data, "bench": a.bench, "max_new_tokens": a.max_new_tokens,
            **({"steps_of": sorted(a.steps_of)} if a.steps_of else {})}


def summary(rows: list[dict]) -> dict:
    """Per configuration: mean and std over seeds of every numeric metric all its runs have."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    out = {}
    for name, rs in by.items():
        keys = [k for k, v in rs[0].items() if isinstance(v, (int, float)) and k not in ("seed", "steps",
                "max_new_tokens", "config_steps") and all(k in r for r in rs)]
        out[name] = {"seeds": sorted(r["seed"] for r in rs), "steps": rs[0].get("config_steps", rs[0]["steps"]),
                     **{k: {"mean": round(statistics.mean(r[k] for r in rs), 4),
                            "std": round(statistics.pstdev(r[k] for r in rs), 4)} for k in keys}}
    return out


def markdown(s: dict) -> str:
    cols = list(dict.fromkeys(k for m in s.values() for k in m if k not in ("seeds", "steps", "train_s")))
    lines = ["| configuration | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, m in s.items():
        cells = [f"{m[c]['mean']:.3f} ± {m[c]['std']:.3f}" if c in m else "–" for c in cols]
        lines.append(f"| {name} | {len(m['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="losses", choices=["losses", "heads", "eagle3", "all"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--data", default="runs/default/teacher", help="the dataset every run trains on")
    ap.add_argument("--bench", default="mtbench:80,humaneval:40", help="benchmarks as BENCH:LIMIT, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--only", default="", help="run only the configurations whose names contain this")
    ap.add_argument("--markdown", action="store_true", help="only print the table of what OUT holds")
    ap.add_argument("--json", default=None, help="also write the summary and the runs here (bench/results/...)")
    ap.add_argument("--steps-of", action="append", default=[], metavar="KIND=N",
                    help="train drafters of this kind N steps instead of --steps (equal wall time)")
    a = ap.parse_args()

    from koala.threads import cpu_model

    log = Path(a.out) / "runs.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    configs = {n: o for n, o in grid(a.grid).items() if a.only in n}
    same = [r for r in done if r["config"] in configs and all(r.get(k) == v for k, v in budget(a).items())]
    if a.markdown:
        print(markdown(summary(same)))
        return
    todo = [(n, o, s) for s in map(int, a.seeds.split(",")) for n, o in configs.items()
            if not any(r["config"] == n and r["seed"] == s for r in same)]
    print(f"{len(todo)} runs to go ({len(configs)} configurations x seeds {a.seeds}, {a.steps} steps), "
          f"{len(same)} already in {log} under this budget", flush=True)
    if todo:
        from koala.engine.session import Session
        from koala.config import load_config

        tc = load_config(a.profile).target
        session = Session.open(tc.spec, dtype=tc.dtype, device=tc.device, compile=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        for i, (name, overrides, seed) in enumerate(todo, 1):
            t0 = time.perf_counter()
            row = {**run_one(session, name, overrides, seed, a), "cpu": cpu_model()}
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            same.append(row)
            print(f"[{i}/{len(todo)}] {name} seed {seed}: {time.perf_counter() - t0:.0f} s, "
                  f"{json.dumps({k: v for k, v in row.items() if k.startswith(('heldout', 'tau', 'speedup'))})}",
                  flush=True)
    result = {"cpu": cpu_model(), **budget(a), "gamma": GAMMA, "summary": summary(same)}
    if a.json:  # the summary with the bench header (command, commit, CPU and its flags) and every run
        from koala import benchinfo

        benchinfo.write({**benchinfo.header(), **result, "runs": same}, a.json)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
