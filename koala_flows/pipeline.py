"""The whole pipeline as one flow: data, drafter, evaluation, registry, promotion."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from koala_flows.build_dataset import build_distillation_dataset
from koala.config import HEAD_KINDS, EvalConfig, LossName, TrainingConfig, parse_bench, unbudgeted
from koala.report import Headline, RunSummary, StageSummary, TrainedDrafter
from koala.tracking import Tracker, check_reachable, resolve_uri
from koala_tasks.common import resolve_config
from koala_tasks.evaluation import evaluate_drafter, prepare_evaluation, promote_drafter, register_drafter
from koala_flows.train_nodes import distill_on_nodes
from koala_tasks.training import train_drafter

Profile = Literal["smoke", "default", "gpu"]
Loss = LossName


@flow(name="koala-pipeline", log_prints=True)
def koala_pipeline(
    profile: Profile = "smoke",
    config_path: str | None = None,
    prompt_source: str | None = None,
    n_prompts: int | None = None,
    loss: Loss | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
) -> RunSummary:
    """Build (or extend) the distillation set, train a drafter, evaluate it, register it, promote it if it wins.

    Args:
        profile: koala/profiles/NAME.yaml: smoke (a CPU in minutes), default or gpu.
        config_path: a YAML config file instead of a profile.
        prompt_source: sharegpt, sharegpt-heldout, mtbench, a file, or a directory of prompt logs (incremental runs).
        n_prompts: use at most this many prompts.
        loss: distillation loss (default: the profile's).
        steps: distillation steps (default: the profile's).
        overrides: more `section.field=value` settings.
    """
    started = time.monotonic()
    extra = [f"{k}={v}" for k, v in (("prompts.source", prompt_source), ("prompts.limit", n_prompts),
                                      ("training.loss", loss), ("training.steps", steps)) if v]
    cfg = resolve_config(profile, config_path, [*(overrides or []), *extra])
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    check_reachable(uri)  # before any expensive stage
    run_dir = Path(cfg.run_dir)
    log = get_run_logger()

    with Tracker.start(uri, cfg.tracking.experiment, f"pipeline-{flow_run.get_name() or 'local'}",
                       tags={"prefect.flow_run_id": str(flow_run.get_id())}) as parent:
        parent.log_params(cfg.model_dump())
        pid = parent.run_id

        # Step 1: build or extend the distillation set: the target's own answers (the alignment data) and, when
        # the profile asks, the target teacher-forced over logged answers (many more tokens per CPU-hour).
        data_dir = build_distillation_dataset(config_path=None, profile=profile, overrides=_as_overrides(cfg))
        forced_dir = (build_distillation_dataset(config_path=None, profile=profile, overrides=_as_overrides(cfg),
                                                 source="teacher_forced") if cfg.teacher_forced.limit else None)

        # Step 2: pretrain the drafter on text (when the profile asks for it).
        out = run_dir / "drafter"
        # A training task whose output has since gone (deleted, or another clone at the same path) runs again
        # rather than returning the cached path.
        init = (train_drafter.with_options(refresh_cache=_gone(out / "pretrain" / "drafter"))(
            unbudgeted(cfg), "pretrain", str(out / "pretrain"), parent_run_id=pid).dir
            if cfg.training.pretrain_steps > 0 else None)

        # Step 3: train on teacher-forced data, then fine-tune on the target's own answers (or one stage), in the
        # minutes the run's budget leaves.
        tc = cfg.training
        kept, prebuilt_s = (evaluation_reserve(cfg, log.info) if tc.run_minutes is not None and tc.eval_minutes is None
                            else (None, 0.0))
        minutes = training_minutes(tc, (time.monotonic() - started) / 60, log.info, kept)
        if kept is not None:
            parent.log_metrics({"eval_minutes_estimated": kept})
        trained, stages = _train(cfg, data_dir, forced_dir, out, init, pid, minutes)

        # Step 4: measure it: tau, speed-up, losslessness (and on more benchmarks, and without prompt lookup).
        evaluated = time.monotonic()
        report = evaluate_drafter(cfg, trained.spec, str(run_dir / "eval" / "candidate"), pid)
        extra = _more_evaluations(cfg, trained.spec, run_dir / "eval", pid)

        # Step 5: register it in MLflow.
        registered = register_drafter(cfg, trained.dir, report, pid)

        # Step 6: promote it to `champion` if it is lossless and beats the champion, re-measured here.
        decision = promote_drafter(cfg, registered, report, str(run_dir / "eval"), pid)
        parent.set_tags({"promoted": decision.promoted, "promotion_reason": decision.reason})
        parent.log_metrics({"tau": report.tau, "speedup": report.speedup,
                            "eval_minutes": (time.monotonic() - evaluated) / 60})  # the promotion's included

    summary = RunSummary.of(report, prebuilt_s, data=data_dir, drafter=trained.spec, stages=stages, more=extra,
                            model=registered["name"], version=registered["version"], promoted=decision.promoted,
                            reason=decision.reason, mlflow_uri=uri, mlflow_run_id=pid,
                            experiment=cfg.tracking.experiment)
    log.info("pipeline summary: %s", summary.model_dump(mode="json"))
    return summary


MIN_TRAINING_MINUTES = 0.5  # a run past its budget before training still trains (a few steps) and finishes


def training_minutes(tc: TrainingConfig, elapsed: float, say=print, estimated: float | None = None) -> float | None:
    """The training stages' minutes: training.max_minutes, or under training.run_minutes what the run has left after
    `elapsed` minutes, less the evaluation's minutes (training.eval_minutes, or where that is None the `estimated`
    ones), if that is less (at least MIN_TRAINING_MINUTES)."""
    if tc.run_minutes is None:
        return tc.max_minutes
    kept = tc.eval_minutes if tc.eval_minutes is not None else estimated or 0.0
    left = max(MIN_TRAINING_MINUTES, tc.run_minutes - elapsed - kept)
    if tc.max_minutes is not None and left >= tc.max_minutes:
        return tc.max_minutes
    say(f"training.run_minutes {tc.run_minutes:g}: {elapsed:.1f} min so far and {kept:.1f} kept for the "
        f"evaluation leave the training {left:.1f} min" + (f" of its {tc.max_minutes:g}" if tc.max_minutes else ""))
    return left


def evaluation_reserve(cfg, say=print) -> tuple[float, float]:
    """About how many minutes the evaluation after the training will take, measured before it: the target is built
    (or loaded) as the evaluation will decode it (`prepare_evaluation`: a first build's minutes are then spent
    before the training's budget is set) and its plain decoding timed; the estimate is the generations and tokens
    every benchmark runs at most (`koala.evaluate.evaluation_work`; the champion re-measured too where there is
    one) at those rates, plus training.eval_setup_minutes per evaluation. Returns (minutes, the seconds spent
    compiling here)."""
    from koala.evaluate import evaluation_work, shares_baseline

    evals = [cfg.eval, *_more_runs(cfg).values()]
    ready = prepare_evaluation(cfg, evals)
    work = [evaluation_work(e, n, autoregressive=i == 0 or not shares_baseline(e, cfg.eval), compiled=e.compile)
            for i, (e, n) in enumerate(zip(evals, ready["prompts"]))]
    if _has_champion(cfg):  # re-measured on the first benchmark beside the candidate, the baseline shared
        work.append(evaluation_work(cfg.eval, ready["prompts"][0], autoregressive=False, compiled=cfg.eval.compile))
    runs, tokens = sum(r for r, _ in work), sum(t for _, t in work)
    setup = len(work) * cfg.training.eval_setup_minutes
    minutes = (tokens * ready["token_s"] + runs * ready["prefill_s"]) / 60 + setup
    say(f"evaluation: about {minutes:.1f} min: {tokens} tokens at the {1 / max(ready['token_s'], 1e-9):.1f} "
        f"tokens/s the target's step measures now (built in {ready['compile_s']:.0f} s), {runs} prefills and "
        f"{setup:g} min of set-up for {len(work)} evaluation{'s' * (len(work) > 1)}")
    return minutes, ready["compile_s"]


def _has_champion(cfg) -> bool:
    """Whether the registry has a champion the promotion will re-measure (False where it cannot be read: the
    promotion then refuses without measuring)."""
    from koala.tracking import Registry
    from koala_tasks.evaluation import model_name

    try:
        return Registry(resolve_uri(cfg.tracking.uri, cfg.run_dir)).champion(model_name(cfg)) is not None
    except Exception:  # noqa: BLE001 - any registry error: nothing to re-measure, as the promotion will find
        return False


def _train(cfg, data_dir: str, forced_dir: str | None, out: Path, init: str | None,
           pid: str, minutes: float | None = None) -> tuple[TrainedDrafter, list[StageSummary]]:
    """The drafter's training stages: on teacher-forced data (when there is some), then on the sampled data for
    training.finetune_steps, in `minutes` together (shared in proportion to their steps; None: their step counts);
    returns the last stage's drafter and what each stage scored held out."""
    heads = cfg.drafter.kind in HEAD_KINDS
    plan = [(forced_dir, cfg)] if forced_dir else []
    if not forced_dir or cfg.training.finetune_steps:
        ft = cfg if not forced_dir else cfg.model_copy(
            update={"training": cfg.training.model_copy(update={"steps": cfg.training.finetune_steps})})
        plan.append((data_dir, ft))
    total = sum(c.training.steps for _, c in plan)
    shares = [None if minutes is None else minutes * c.training.steps / total for _, c in plan]
    trained, stages, prev = None, [], None
    for i, ((data, c), share) in enumerate(zip(plan, shares)):
        last = i == len(plan) - 1
        name = ("heads" if heads else "distill") + ("" if last else "-" + (
            "teacher_forced" if data == forced_dir else "generated"))
        if not heads and c.distributed.nodes > 1:  # one torchrun job over that many workers of the pool
            budgeted = c.model_copy(update={"training": c.training.model_copy(update={"max_minutes": share})})
            trained = distill_on_nodes(data, str(out / name), profile=None, overrides=_as_overrides(budgeted),
                                       init_from=prev or init)
        else:
            trained = train_drafter.with_options(refresh_cache=_gone(out / name / ("heads" if heads else "drafter")))(
                unbudgeted(c), "heads" if heads else "distill", str(out / name), data_dir=data,
                init_from=prev if heads else prev or init, heldout_dir=data_dir if heads else None, parent_run_id=pid,
                minutes=share)
        prev = trained.dir
        ran = (_recorded(trained.dir, "metrics") or {}).get("steps_run", c.training.steps)  # fewer under a budget
        stages.append(StageSummary(data=data, steps=ran, drafter=trained.spec,
                                   compute_dtype=_recorded(trained.dir, "compute_dtype"), heldout=trained.heldout()))
    return trained, stages


def _recorded(drafter_dir: str, key: str):
    """A field of what a trained drafter records about itself (heads.json or koala.json), or None."""
    for name in ("heads.json", "koala.json"):
        try:
            return json.loads((Path(drafter_dir) / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
    return None


def _more_evaluations(cfg, drafter: str, out: Path, pid: str) -> dict[str, Headline]:
    """eval.alone (the drafter without prompt lookup) and eval.also (more benchmarks): their tau and speed-up."""
    results = {}
    for name, ev in _more_runs(cfg).items():
        r = evaluate_drafter(cfg.model_copy(update={"eval": ev}), drafter, str(out / f"candidate-{name}"), pid,
                             run_name=f"evaluate-{name}")
        results[name] = Headline(bench=ev.bench, prompts=r.prompts, lookup=ev.lookup, tau=r.tau, speedup=r.speedup,
                                 lossless=r.lossless.summary)
    return results


def _more_runs(cfg) -> dict[str, EvalConfig]:
    """The evaluations after the first, by name: eval.alone (the drafter without prompt lookup), eval.also."""
    runs = {}
    if cfg.eval.alone and cfg.eval.lookup:
        runs["alone"] = cfg.eval.model_copy(update={"lookup": False})
    for spec in cfg.eval.also:
        bench, limit = parse_bench(spec)
        name = Path(bench.removeprefix("hf:")).stem + (f"-{limit}" if limit else "")
        runs[name if name not in runs else f"{name}-{len(runs)}"] = cfg.eval.model_copy(
            update={"bench": bench, "limit": limit})
    return runs


def _gone(output: Path) -> bool:
    return not any(output.glob("*.safetensors"))


def _as_overrides(cfg) -> list[str]:
    """The resolved config as overrides, so the sub-flow sees exactly what this flow resolved."""
    import json

    from koala.tracking import flatten

    return [f"{k}={json.dumps(v)}" for k, v in flatten(cfg.model_dump()).items()]
