"""Prefect tasks: evaluate a drafter, register it in MLflow, promote it to `champion` by the rule."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from koala.config import EvalConfig, KoalaConfig
from koala.errors import KoalaError
from koala.interrupt import fault
from koala.evaluate import evaluate
from koala.promotion import Promotion, promote
from koala.render import summary_line
from koala.report import EvalReport
from koala.engine.drafter_spec import spec_of_dir
from koala.tracking import WEIGHTS_TAG, Registry, Tracker, resolve_uri
from koala_tasks.common import decoding_target, retry_unless_koala_error, session_for

EVAL_KEYS = ("bench", "gamma", "threshold", "lookup", "temperature", "top_p", "max_new_tokens", "limit", "compile",
             "dtype", "weights", "autotune")


def model_name(cfg: KoalaConfig) -> str:
    """The registered model's name: koala-drafter-<target>."""
    from koala.targets import _resolve  # noqa: PLC2701 - the name rule lives with the target specs

    name = _resolve(cfg.target.spec)[0] if cfg.target.spec.count("/") != 1 else cfg.target.spec.replace("/", "-")
    return f"koala-drafter-{name}".replace(" ", "-")


def _metrics(report: EvalReport) -> dict:
    m = {"tau": report.tau, "speedup": report.speedup, "memory_bound_speedup": report.memory_bound_speedup,
         "latency_model_speedup": report.latency_model_speedup, "lossless_identical": report.lossless.identical,
         "lossless_total": report.lossless.total, "gamma": report.gamma, "compile_s": report.compile_s,
         "setup_s": report.setup_s,
         "tokens_per_s": {k: v for k, v in report.tokens_per_s.model_dump().items() if v is not None}}
    for cat, c in report.per_category.items():
        m[f"category.{cat}.tau"], m[f"category.{cat}.speedup"] = c.tau, c.speedup
    for i, a in enumerate(report.acceptance_by_position):
        m[f"acceptance.pos{i + 1}"] = a
    if report.speedup_ci95:
        m["speedup_ci95_low"], m["speedup_ci95_high"] = report.speedup_ci95
    if report.auto:
        m["expected_speedup"] = report.gamma_choice["expected_speedup"]
    return m


@task(name="evaluate-drafter", tags=["gpu"], retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_koala_error)
def evaluate_drafter(cfg: KoalaConfig, drafter: str, out_dir: str, parent_run_id: str | None = None,
                     run_name: str = "evaluate") -> EvalReport:
    """Measure a drafter on the benchmark; logs metrics, report and plots; returns the report."""
    log = get_run_logger()
    s = session_for(decoding_target(cfg), compile=cfg.eval.compile, weights=cfg.eval.weights,
                    autotune=cfg.eval.autotune)
    log.info("evaluating %s: %s", drafter, s.describe())
    t0 = time.perf_counter()

    def progress(i, n, row):
        eta = (time.perf_counter() - t0) / i * (n - i)
        log.info("prompt %d/%d: tau %.2f, %.1f tokens/s (about %.0f s left)", i, n, row.tau, row.tokens_per_s, eta)

    def stage(text):
        nonlocal t0
        t0 = time.perf_counter()
        log.info("%s", text)

    report = evaluate(s, drafter, cfg.eval, out_dir=out_dir, progress=progress, stage=stage)
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    with Tracker.start(uri, cfg.tracking.experiment, run_name, parent_run_id=parent_run_id) as tr:
        tr.log_params({"eval": cfg.eval.model_dump(), "drafter": drafter})
        tr.log_metrics(_metrics(report))
        tr.log_artifact(out_dir, "evaluation")
        report.run_id = tr.run_id
    log.info(summary_line(report))
    return report


@task(name="prepare-evaluation", tags=["gpu"], cache_policy=NO_CACHE)
def prepare_evaluation(cfg: KoalaConfig, evals: list[EvalConfig]) -> dict:
    """The target as the evaluations `evals` will decode it, ready before the training (its compiled steps built or
    loaded: the minutes a first build takes are spent before the training's budget is set, not after it), and its
    plain decoding measured: `koala.evaluate.warm_target`'s {"token_s", "prefill_s", "prompts"}, and "compile_s",
    the seconds spent compiling."""
    from koala.engine.compile import compile_seconds
    from koala.evaluate import warm_target
    from koala.threads import restore as restore_threads

    log = get_run_logger()
    s = session_for(decoding_target(cfg), compile=cfg.eval.compile, weights=cfg.eval.weights,
                    autotune=cfg.eval.autotune)
    log.info("the evaluation's target, built before the training: %s", s.describe())
    before = compile_seconds()
    try:
        return {**warm_target(s, evals), "compile_s": compile_seconds() - before}
    finally:
        restore_threads()  # the training after it runs on every core, whatever the decoding loop gave away


@task(name="register-drafter", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_unless_koala_error)
def register_drafter(cfg: KoalaConfig, drafter_dir: str, report: EvalReport, parent_run_id: str | None = None) -> dict:
    """Log the drafter as an MLflow model, register a new version and tag it with its evaluation.

    Idempotent: the version carries the drafter's weights digest, and the same weights (a retried task, a pipeline
    rerun after a kill) get the version they already have instead of a second one.
    """
    from koala.training.checkpoints import weights_digest

    name = model_name(cfg)
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    registry = Registry(uri)
    digest = weights_digest(drafter_dir)
    logged = registry.version_with_weights(name, digest)
    if logged is None:
        fault("registry.register")
        with Tracker.start(uri, cfg.tracking.experiment, "register", parent_run_id=parent_run_id) as tr:
            logged = tr.log_drafter(drafter_dir, registered_name=name, version_tags={WEIGHTS_TAG: digest})
    tags = {"tau": f"{report.tau:.4f}", "speedup": f"{report.speedup:.4f}", "gamma_chosen": report.draft_shape,
            "mode": report.mode, "lossless": report.lossless.text, "device": report.device, "dtype": report.dtype,
            "drafter_dir": drafter_dir,
            **{f"eval.{k}": str(v) for k, v in cfg.eval.model_dump().items() if k in EVAL_KEYS}}
    if report.speedup_ci95:  # what the promotion rule reads: the interval's lower bound
        tags["speedup_ci95_low"], tags["speedup_ci95_high"] = (f"{x:.4f}" for x in report.speedup_ci95)
    registry.tag(name, logged["version"], tags)
    get_run_logger().info("registered %s version %s", name, logged["version"])
    return {"name": name, "version": logged["version"], "model_uri": logged["model_uri"]}


@task(name="promote-drafter", retries=0)
def promote_drafter(cfg: KoalaConfig, registered: dict, report: EvalReport, out_dir: str,
                    parent_run_id: str | None = None) -> Promotion:
    """Give the candidate the alias `champion` if the rule says so (koala.promotion); tag the version with the decision
    either way. A registry error refuses the promotion: the champion stays as it was, the reason says why."""
    registry = Registry(resolve_uri(cfg.tracking.uri, cfg.run_dir))
    name, version = registered["name"], registered["version"]

    def remeasure(drafter_dir: str, champion_version: str) -> EvalReport:
        return evaluate_drafter.fn(cfg, spec_of_dir(drafter_dir), str(Path(out_dir) / f"champion-v{champion_version}"),
                                   parent_run_id, run_name=f"re-measure-champion-v{champion_version}")

    try:
        p = promote(registry, name, version, report, Path(cfg.run_dir) / "promotion.lock", remeasure, fault)
    except KoalaError:
        raise
    except Exception as e:  # noqa: BLE001 - any registry error: refuse, the champion stays as it was
        p = _refused(registry, name, version, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    log = get_run_logger()
    log.info("%s v%s: %s (%s)", name, version, "promoted" if p.promoted else "not promoted", p.reason)
    return p


def _refused(registry: Registry, name: str, version: str, why: str) -> Promotion:
    """After a registry error: promoted if the alias had already moved (a later tag failed), else refused, recorded."""
    log = get_run_logger()
    try:
        if str(registry.champion(name).version) == str(version):
            log.error("%s v%s: promoted, but a tag could not be written (%s)", name, version, why)
            return Promotion(True, f"promoted (a tag could not be written: {why})")
    except Exception:  # noqa: BLE001 - the registry cannot even be read: not promoted, as below
        pass
    reason = f"not promoted: registry error ({why})"
    log.error("%s v%s: %s; champion unchanged", name, version, reason)
    try:
        registry.record_decision(name, version, False, reason)
    except Exception:  # noqa: BLE001 - the registry may be down altogether: the log says why
        pass
    return Promotion(False, reason)
