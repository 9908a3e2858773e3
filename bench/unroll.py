"""Heads' training settings compared at equal minutes: the same minutes of koala's own recipe (`train_heads` under
`training.max_minutes`) for each setting, measured by draft position; prints JSON.

    python bench/unroll.py [--profile smoke] [--data runs/smoke/teacher] [--minutes M] [--unrolls 1,2,3]
        [--arm NAME=SECTION.FIELD=VALUE[,SECTION.FIELD=VALUE...] ...] [--own runs/exp/data200] [--seeds 0,1]
        [--out runs/unroll] [--json bench/results/unroll.json]

By default the settings are how many drafts an EAGLE head is trained to unroll (`--unrolls`). Training draft p on
the head's own prediction from draft p-1 (training-time test) costs a forward and a backward of the head per
unrolled draft, so within a fixed budget unroll 1 runs several times the steps of unroll 3 (the steps each fits on
this machine are recorded). `--arm` compares any other settings instead, each a name and the profile overrides it
applies (e.g. `--arm ce0.1=training.eagle_ce_weight=0.1 --arm ce1=training.eagle_ce_weight=1`). Every head is
measured three drafts deep, as the engine drafts, whatever it was trained to unroll: greedy agreement with the
target by draft position on the data's held-out rows (teacher-forced answers) and, with --own, on the held-out
rows of a set of the target's own answers (`koala sample`): the answers greedy decoding verifies drafts against.
The budget defaults to the profile's first training stage's share of `training.max_minutes`. Finished runs are kept
under OUT by settings (the data's digest among them): the same command goes on where it stopped.
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

from koala.training.heads_objectives import MEASURED_DRAFTS  # noqa: E402 - how deep every head is measured


def agreement(session, cfg, heads_dir: Path, data: str) -> dict:
    """Held-out greedy agreement of the heads by draft position on `data`'s held-out rows (the target's features for
    those rows only), `MEASURED_DRAFTS` deep, in the profile's compute dtype as decoding runs."""
    import torch

    from koala.models.heads import load_heads
    from koala.models.vocab import load_draft_vocab
    from koala.precision import for_model
    from koala.training.data import training_data
    from koala.training.features import FeatureSource
    from koala.training.heads_objectives import heads_objective
    from koala.training.objectives import heldout_metrics

    model = session.target.model
    heads, prior = load_heads(heads_dir, model)
    split = training_data(cfg, session.target, data, features=True)
    if not split.heldout:
        sys.exit(f"{data}: no held-out rows to measure on: use a larger set")
    compute = for_model(cfg.compute_dtype, model)
    with torch.no_grad(), compute.autocast(model.device):
        held = FeatureSource(model, split.heldout, True, "heldout", data, session.target.info.content_hash,
                             aux_layers=getattr(heads, "aux_layers", None),
                             stored_layers=split.manifest.sampling.get("aux_layers"))
        objective = heads_objective(prior["kind"], heads.eval(), model, held, held,
                                    vocab_ids=load_draft_vocab(heads_dir))
        m = heldout_metrics(objective, split.heldout, model.device)
    return {f"pos{p}": round(m[f"heldout_greedy_agreement_pos{p}"], 4) for p in range(1, MEASURED_DRAFTS + 1)}


def _digest(data: str) -> str:
    """The shards a data directory holds (its manifest's record of them): a grown set is another setting."""
    from koala.data import shards
    from koala.io import digest

    return digest(shards.read_manifest(Path(data)).done_json())


def run_one(session, arm: str, overrides: list[str], seed: int, a) -> dict:
    from koala.training.recipes import train_heads

    cfg = arm_config(a, overrides, seed)
    out = Path(a.out) / f"{a.profile}-{a.data_digest[:12]}-{a.minutes}m" / _folder(arm) / f"seed{seed}"
    t0 = time.perf_counter()
    path = train_heads(cfg, session.target, a.data, out, resume="auto", progress=False)
    train_s = time.perf_counter() - t0
    info = json.loads((path / "heads.json").read_text())
    steps = info["metrics"]["steps_run"]
    r = {"arm": arm, "overrides": overrides, "trained": trained(cfg), "unroll": cfg.training.unroll, "seed": seed,
         "steps": steps,
         "s_per_step": round(train_s / steps, 3), "train_s": round(train_s, 1), "train_rows": info["train_rows"],
         "heldout_rows": info["heldout_rows"],
         "heldout": agreement(session, cfg, path, a.data)}  # in the compute dtype (the training's own is float32)
    if a.own:
        r["own"] = agreement(session, cfg, path, a.own)
    return r


def arm_config(a, overrides: list[str], seed: int):
    """The profile with an arm's overrides, as `run_one` trains it."""
    from koala.config import load_config

    return load_config(a.profile, overrides=[
        "drafter.kind=eagle", f"training.seed={seed}", "training.steps=100000", f"training.max_minutes={a.minutes}",
        "training.eval_every=1000000", "training.checkpoint_every=1000000", *overrides])


def trained(cfg) -> str:
    """A digest of what an arm trains (its drafter and training settings, the seed and budget aside): a run made
    under other settings, by an edited profile or another arm of the same name, is not reused."""
    from koala.config import BUDGET_FIELDS
    from koala.io import digest

    return digest(cfg.drafter.model_dump(), cfg.training.model_dump(exclude={"seed", "out_dir", *BUDGET_FIELDS}))


def _folder(arm: str) -> str:
    """An arm's run folder: `unroll{N}` for the default arms (as earlier runs of this bench named them)."""
    import re

    return f"unroll{arm}" if arm.isdigit() else re.sub(r"[^A-Za-z0-9_.-]+", "_", arm)


def parse_arms(a) -> dict[str, list[str]]:
    """Arm name -> profile overrides: `--arm` as given, else one arm per `--unrolls` entry (named by it)."""
    if not a.arm:
        return {u: [f"training.unroll={int(u)}"] for u in a.unrolls.split(",")}
    arms = {}
    for text in a.arm:
        name, sep, overrides = text.partition("=")
        if (not sep or not name or name.isdigit() or name in arms
                or any("=" not in o for o in overrides.split(",") if o)):
            sys.exit(f"--arm {text!r}: write NAME=SECTION.FIELD=VALUE[,SECTION.FIELD=VALUE...] (each NAME once, not a "
                     "number: those name --unrolls), e.g. --arm ce1=training.eagle_ce_weight=1")
        arms[name] = [o for o in overrides.split(",") if o]
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", default="runs/smoke/teacher", help="teacher-forced or sampled shards to train on")
    ap.add_argument("--minutes", type=float, default=None,
                    help="each training's wall-clock budget (default: the profile's first stage's share)")
    ap.add_argument("--unrolls", default="1,2,3")
    ap.add_argument("--arm", action="append", default=[],
                    help="NAME=SECTION.FIELD=VALUE[,...]: compare these settings instead of unrolls (repeatable)")
    ap.add_argument("--own", default=None, help="also measure on this set of the target's own answers (koala sample)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="runs/unroll")
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args()
    from koala import benchinfo
    from koala.config import load_config
    from koala.engine.calibrate import expected_tokens
    from koala.engine.session import Session

    for flag, d in (("--data", a.data), ("--own", a.own)):
        if d and not (Path(d) / "manifest.json").exists():
            sys.exit(f"{flag} {d}: no shards there: run `koala run --profile {a.profile}` first (it writes "
                     f"runs/{a.profile}/teacher), or `koala sample` and pass its --out")
    t = load_config(a.profile).training
    if a.minutes is None:
        if not t.max_minutes:
            sys.exit(f"profile {a.profile} sets no training.max_minutes: pass --minutes")
        a.minutes = round(t.max_minutes * t.steps / (t.steps + t.finetune_steps), 2)
    a.data_digest = _digest(a.data)
    setting = {"profile": a.profile, "data": a.data, "data_digest": a.data_digest, "minutes": a.minutes,
               "own_data": a.own, "own_digest": _digest(a.own) if a.own else None}
    arms = parse_arms(a)
    log = benchinfo.RunLog(a.out, setting, key=lambda r: (r.get("arm", str(r.get("unroll"))), r.get("trained"),
                                                          r["seed"]))
    done = log.done
    tc = load_config(a.profile).target
    seeds = [int(s) for s in a.seeds.split(",")]
    key = {(arm, seed): (arm, trained(arm_config(a, overrides, seed)), seed) for arm, overrides in arms.items()
           for seed in seeds}
    session = None
    for seed in seeds:
        for arm, overrides in arms.items():
            if key[arm, seed] not in done:
                session = session or Session.open(tc.spec, dtype=tc.dtype, device=tc.device)
                log.add(run_one(session, arm, overrides, seed, a))
    summary = {}
    for arm in arms:
        runs = [done[key[arm, s]] for s in seeds]
        summary[arm] = {"steps": statistics.mean(r["steps"] for r in runs), "overrides": arms[arm]}
        for where in ("heldout", "own") if a.own else ("heldout",):
            summary[arm][where] = {p: round(statistics.mean(r[where][p] for r in runs), 4) for p in runs[0][where]}
            summary[arm][where]["std"] = {p: round(statistics.stdev(r[where][p] for r in runs), 4) if len(runs) > 1
                                          else 0.0 for p in runs[0][where]}
            m = summary[arm][where]  # tokens a 3-draft chain yields per round, from the acceptance by position
            m["chain3_tokens"] = round(expected_tokens([m[f"pos{p}"] for p in range(1, MEASURED_DRAFTS + 1)],
                                                       MEASURED_DRAFTS), 3)
    benchinfo.write({**benchinfo.header(), **setting, "arms": list(arms), "seeds": seeds, "summary": summary,
                     "runs": [done[key[arm, s]] for s in seeds for arm in arms]}, a.json)


if __name__ == "__main__":
    main()
