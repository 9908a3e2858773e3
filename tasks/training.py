"""Prefect tasks of drafter training: retries resume from the last checkpoint instead of starting over."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task

from koala import __version__
from koala.config import KoalaConfig
from koala.data import shards
from koala.training.recipes import distill, pretrain
from koala.plots import training_curves
from koala.tracking import Tracker, resolve_uri
from koala.training.checkpoints import weights_digest
from koala_tasks.common import retry_unless_koala_error, session_for


def _key(*parts) -> str:
    """A cache key from the stage's inputs and koala's version (new training code: a new drafter)."""
    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


def distill_cache_key(context, p) -> str:
    """Same config, data (by manifest) and starting point: the same drafter."""
    cfg: KoalaConfig = p["cfg"]
    manifest = shards.read_manifest(Path(p["data_dir"])) or {}
    return "distill-" + _key(cfg.target.model_dump(), cfg.drafter.model_dump(), cfg.training.model_dump(),
                             manifest.get("done"), str(Path(p["out_dir"]).resolve()), p.get("init_from"), p.get("loss"),
                             weights_digest(p.get("init_from")))


def pretrain_cache_key(context, p) -> str:
    cfg: KoalaConfig = p["cfg"]
    return "pretrain-" + _key(cfg.target.model_dump(), cfg.drafter.model_dump(), cfg.training.model_dump(),
                              str(Path(p["out_dir"]).resolve()))


def _logged(tracker: Tracker, history: list):
    def on_log(step: int, metrics: dict) -> None:
        history.append((step, metrics))
        tracker.log_metrics(metrics, step=step)
    return on_log


@task(name="pretrain-drafter", tags=["gpu"], retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_koala_error, cache_key_fn=pretrain_cache_key, persist_result=True)
def pretrain_drafter(cfg: KoalaConfig, out_dir: str, parent_run_id: str | None = None) -> str:
    """Pretrain the drafter on text; returns the drafter directory."""
    s = session_for(cfg.target)
    history: list = []
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    with Tracker.start(uri, cfg.tracking.experiment, "pretrain", parent_run_id=parent_run_id) as tr:
        tr.log_params({"training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump()})
        path = pretrain(cfg, s.target, out_dir, resume="auto", on_log=_logged(tr, history), progress=False)
        tr.log_artifact(training_curves(history, Path(out_dir) / "pretrain_curves.png", "pretraining loss"))
    get_run_logger().info("pretrained drafter: %s", path)
    return str(path)


@task(name="distill-drafter", tags=["gpu"], retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_koala_error, cache_key_fn=distill_cache_key, persist_result=True)
def distill_drafter(cfg: KoalaConfig, data_dir: str, out_dir: str, init_from: str | None = None,
                    loss: str | None = None, parent_run_id: str | None = None) -> dict:
    """Distil the drafter on the target's samples; returns {drafter, run_id, metrics}."""
    s = session_for(cfg.target)
    history: list = []
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    with Tracker.start(uri, cfg.tracking.experiment, f"distill-{loss or cfg.training.loss}",
                       parent_run_id=parent_run_id) as tr:
        tr.log_params({"training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump(),
                       "data_dir": data_dir, "init_from": init_from})
        path = distill(cfg, s.target, data_dir, out_dir, loss=loss, resume="auto", init_from=init_from,
                       on_log=_logged(tr, history), progress=False)
        tr.log_artifact(training_curves(history, Path(out_dir) / "distill_curves.png", f"{loss or cfg.training.loss}"))
        tr.log_artifact(path / "koala.json")
        run_id = tr.run_id
    get_run_logger().info("distilled drafter: %s", path)
    return {"drafter": str(path), "run_id": run_id, "metrics": history[-1][1] if history else {}}


def heads_cache_key(context, p) -> str:
    cfg: KoalaConfig = p["cfg"]
    manifest = shards.read_manifest(Path(p["data_dir"])) or {}
    held = (shards.read_manifest(Path(p["heldout_dir"])) or {}).get("done") if p.get("heldout_dir") else None
    return "heads-" + _key(cfg.target.model_dump(), cfg.drafter.model_dump(), cfg.training.model_dump(),
                           manifest.get("done"), str(Path(p["out_dir"]).resolve()), p.get("init_from"),
                           weights_digest(p.get("init_from")), held)


@task(name="train-heads", tags=["gpu"], retries=1, retry_delay_seconds=[10],
      retry_condition_fn=retry_unless_koala_error, cache_key_fn=heads_cache_key,
      persist_result=True)
def train_heads_task(cfg: KoalaConfig, data_dir: str, out_dir: str, parent_run_id: str | None = None,
                     init_from: str | None = None, heldout_dir: str | None = None) -> dict:
    """Train KOALA draft heads (Medusa or EAGLE, K layers, adversarial when configured); returns {drafter, run_id}.

    A retry resumes from the last checkpoint; `init_from` continues earlier heads (a second stage on other data).
    """
    from koala.training.recipes import train_heads

    s = session_for(cfg.target)
    history: list = []
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    name = f"heads-{cfg.drafter.kind}-K{cfg.drafter.layers}{'-adv' if cfg.training.adversarial else ''}"
    name += f"-{(shards.read_manifest(Path(data_dir)) or {}).get('source', 'generated')}"
    with Tracker.start(uri, cfg.tracking.experiment, name, parent_run_id=parent_run_id) as tr:
        tr.log_params({"training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump(),
                       "data_dir": data_dir, "init_from": init_from})
        path = train_heads(cfg, s.target, data_dir, out_dir, on_log=_logged(tr, history), progress=False,
                           init_from=init_from, heldout_dir=heldout_dir, resume="auto")
        tr.log_artifact(training_curves(history, Path(out_dir) / "heads_curves.png", name))
        tr.log_artifact(path / "heads.json")
        run_id = tr.run_id
    get_run_logger().info("draft heads: %s", path)
    return {"drafter": f"heads:{path}", "dir": str(path), "run_id": run_id,
            "metrics": history[-1][1] if history else {}}
