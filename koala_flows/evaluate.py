"""Flow: re-measure a registered drafter (by version or alias) on this machine; the `evaluate` deployment."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from koala.engine.drafter_spec import spec_of_dir
from koala.report import EvalReport
from koala.tracking import Tracker, drafter_path, resolve_uri
from koala_tasks.common import resolve_config
from koala_tasks.evaluation import evaluate_drafter, model_name


@flow(name="evaluate-registered-drafter", log_prints=True)
def evaluate_registered(profile: str = "smoke", config_path: str | None = None, version: str | None = None,
                        alias: str = "champion", overrides: list[str] | None = None) -> EvalReport:
    """Evaluate `koala-drafter-<target>` at `version` (or `alias`) with the profile's eval settings.

    Args:
        profile: koala/profiles/NAME.yaml, unless config_path is given.
        config_path: a YAML config file.
        version: a registered version; None uses `alias`.
        alias: the alias to evaluate when no version is given.
        overrides: more `section.field=value` settings.
    """
    cfg = resolve_config(profile, config_path, overrides)
    name = model_name(cfg)
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    ref = f"models:/{name}/{version}" if version else f"models:/{name}@{alias}"
    path = spec_of_dir(drafter_path(ref, uri))
    with Tracker.start(uri, cfg.tracking.experiment, f"evaluate-{name}-{version or alias}") as parent:
        report = evaluate_drafter(cfg, str(path), str(Path(cfg.run_dir) / "eval" / f"{version or alias}"),
                                  parent.run_id)
    print(f"{ref}: tau {report.tau:.2f}, speed-up {report.speedup:.2f}x, lossless {report.lossless.text}")
    return report
