"""Prefect tasks: evaluate a drafter, register it in MLflow, promote it to `champion` by the rule."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from prefect import get_run_logger, task

from koala.config import KoalaConfig
from koala.errors import KoalaError
from koala.interrupt import fault
from koala.evaluate import evaluate, summary_line
from koala.promotion import decide
from koala.engine.drafter_spec import spec_of_dir
from koala.tracking import WEIGHTS_TAG, Registry, Tracker, drafter_path, resolve_uri
from koala_tasks.common import decoding_target, retry_unless_koala_error, session_for

EVAL_KEYS = ("bench", "gamma", "threshold", "lookup", "temperature", "top_p", "max_new_tokens", "limit", "compile",
             "dtype")


def model_name(cfg: KoalaConfig) -> str:
    """The registered model's name: koala-drafter-<target>."""
    from koala.targets import _resolve  # noqa: PLC2701 - the name rule lives with the target specs

    name = _resolve(cfg.target.spec)[0] if cfg.target.spec.count("/") != 1 else cfg.target.spec.replace("/", "-")
    return f"koala-drafter-{name}".replace(" ", "-")


def _metrics(report: dict) -> dict:
    m = {"tau": report["tau"], "speedup": report["speedup"], "memory_bound_speedup": report["memory_bound_speedup"],
         "latency_model_speedup": report["latency_model_speedup"],
         "lossless_identical": report["lossless"]["identical"], "lossless_total": report["lossless"]["total"],
         "tokens_per_s": {k: v for k, v in report["tokens_per_s"].items() if v is not None}}
    for cat, c in report["per_category"].items():
        m[f"category.{cat}.tau"], m[f"category.{cat}.speedup"] = c["tau"], c["speedup"]
    for i, a in enumerate(report["acceptance_by_position"]):
        m[f"acceptance.pos{i + 1}"] = a
    m["gamma"] = report["gamma"]
    if report.get("speedup_ci95"):
        m["speedup_ci95_low"], m["speedup_ci95_high"] = report["speedup_ci95"]
    m["compile_s"], m["setup_s"] = report.get("compile_s", 0.0), report.get("setup_s", 0.0)
    if report.get("gamma_choice", {}).get("auto"):
        m["expected_speedup"] = report["gamma_choice"]["expected_speedup"]
    return m


@task(name="evaluate-drafter", tags=["gpu"], retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_koala_error)
def evaluate_drafter(cfg: KoalaConfig, drafter: str, out_dir: str, parent_run_id: str | None = None,
                     run_name: str = "evaluate") -> dict:
    """Measure a drafter on the benchmark; logs metrics, report and plots; returns the report with only each prompt's
    timings of its per-prompt rows (what the promotion rule's interval pairs)."""
    log = get_run_logger()
    s = session_for(decoding_target(cfg), compile=cfg.eval.compile)
    log.info("evaluating %s: %s", drafter, s.describe())
    t0 = time.perf_counter()

    def progress(i, n, row):
        eta = (time.perf_counter() - t0) / i * (n - i)
        log.info("prompt %d/%d: tau %.2f, %.1f tokens/s (about %.0f s left)", i, n, row["tau"], row["tokens_per_s"], eta)

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
        report["run_id"] = tr.run_id
    get_run_logger().info(summary_line(report))
    timings = [{k: r[k] for k in ("id", "tokens_per_s", "ar_tokens_per_s")} for r in report["per_prompt"]]
    return {**{k: v for k, v in report.items() if k != "per_prompt"}, "per_prompt": timings}  # the rule's pairs


@task(name="register-drafter", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_unless_koala_error)
def register_drafter(cfg: KoalaConfig, drafter_dir: str, report: dict, parent_run_id: str | None = None) -> dict:
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
    tags = {"tau": f"{report['tau']:.4f}", "speedup": f"{report['speedup']:.4f}", "gamma_chosen": str(report.get("gamma")),
            "mode": report.get("mode", "eager"),
            "lossless": f"{report['lossless']['identical']}/{report['lossless']['total']}",
            "device": report["device"], "dtype": report["dtype"], "drafter_dir": drafter_dir,
            **{f"eval.{k}": str(v) for k, v in cfg.eval.model_dump().items() if k in EVAL_KEYS}}
    if report.get("speedup_ci95"):  # what the promotion rule reads: the interval's lower bound
        tags["speedup_ci95_low"], tags["speedup_ci95_high"] = (f"{x:.4f}" for x in report["speedup_ci95"])
    registry.tag(name, logged["version"], tags)
    get_run_logger().info("registered %s version %s", name, logged["version"])
    return {"name": name, "version": logged["version"], "model_uri": logged["model_uri"]}


@task(name="promote-drafter", retries=0)
def promote_drafter(cfg: KoalaConfig, registered: dict, report: dict, out_dir: str,
                    parent_run_id: str | None = None) -> dict:
    """Give the candidate the alias `champion` if the rule says so; tag the version with the decision either way.

    Promotions are serialised by a lock file in the run directory, and the current champion is read and
    re-measured inside it, so two runs promoting at once leave one champion: the better one.
    """
    registry = Registry(resolve_uri(cfg.tracking.uri, cfg.run_dir))
    name, version = registered["name"], registered["version"]
    lock_path = Path(cfg.run_dir) / "promotion.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _decide_and_promote(cfg, registry, lock_path, name, version, report, out_dir, parent_run_id)
    except KoalaError:
        raise
    except Exception as e:  # noqa: BLE001 - any registry error: refuse, the champion stays as it was
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        try:  # the alias may have moved before a later tag failed: then it is promoted, and says so
            if str(registry.champion(name).version) == str(version):
                get_run_logger().error("%s v%s: promoted, but a tag could not be written (%s)", name, version, why)
                return {"promoted": True, "reason": f"promoted (a tag could not be written: {why})",
                        "champion_speedup": None, "previous_champion": None}
        except Exception:  # noqa: BLE001 - the registry cannot even be read: not promoted, as below
            pass
        reason = f"not promoted: registry error ({why})"
        get_run_logger().error("%s v%s: %s; champion unchanged", name, version, reason)
        try:
            registry.record_decision(name, version, False, reason)
        except Exception:  # noqa: BLE001 - the registry may be down altogether: the log says why
            pass
        return {"promoted": False, "reason": reason, "champion_speedup": None, "previous_champion": None}


def _decide_and_promote(cfg, registry: Registry, lock_path: Path, name: str, version: str, report: dict, out_dir: str,
                        parent_run_id: str | None) -> dict:
    """Read the champion, re-measure it, decide, and move the alias, under the promotion lock."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        champ = registry.champion(name)
        if champ is not None and str(champ.version) == str(version):  # a rerun handed back the champion itself
            reason = "already champion (the same weights were registered and promoted before)"
            return {"promoted": True, "reason": reason, "champion_speedup": None, "previous_champion": version}
        champ_report = None
        if champ is not None and str(champ.version) != str(version):
            path = champ.tags.get("drafter_dir")
            if not path or not Path(path).exists():
                path = str(drafter_path(f"models:/{name}@champion", registry.uri))
            path = spec_of_dir(path)
            champ_report = evaluate_drafter.fn(cfg, path, str(Path(out_dir) / f"champion-v{champ.version}"),
                                               parent_run_id, run_name=f"re-measure-champion-v{champ.version}")
        d = decide(report, champ_report, None if champ is None else champ.version)
        registry.record_decision(name, version, None, d.reason)
        fault("registry.promote")
        if d.promote:  # a registry error before this leaves the champion as it was
            registry.make_champion(name, version)
        registry.tag(name, version, {"promoted": str(d.promote).lower()})
    get_run_logger().info("%s v%s: %s (%s)", name, version, "promoted" if d.promote else "not promoted", d.reason)
    return {"promoted": d.promote, "reason": d.reason, "champion_speedup": None if champ_report is None else
            champ_report["speedup"], "previous_champion": None if champ is None else champ.version}

