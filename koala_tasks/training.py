"""The Prefect task of drafter training: one task, parameterised by recipe; a retry resumes from the last checkpoint.

Its cache key is Prefect's own `INPUTS + TASK_SOURCE` (the config, the recipe, the directories, this task's code) plus
what the inputs name but do not hold (`TrainingData`): the data's manifest, the starting drafter's weights, the output
directory as an absolute path, and koala's version (new training code: a new drafter). The same key hands back the
drafter already trained; the flow refreshes it when that drafter's files have since gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from koala import __version__
from koala.config import KoalaConfig
from koala.data import shards
from koala.plots import training_curves
from koala.report import TrainedDrafter
from koala.tracking import Tracker, resolve_uri
from koala.training.checkpoints import weights_digest
from koala_tasks.common import retry_unless_koala_error, session_for

Recipe = Literal["pretrain", "distill", "heads"]


@dataclass
class TrainingData(CachePolicy):
    """The part of a training stage's identity that lives on disk: data manifests and starting weights."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        def done(d):
            m = shards.read_manifest(Path(d)) if d else None
            return None if m is None else m.done_json()

        return hash_objects({"koala": __version__, "data": done(inputs.get("data_dir")),
                             "heldout": done(inputs.get("heldout_dir")), "init": weights_digest(inputs.get("init_from")),
                             "out": str(Path(inputs["out_dir"]).resolve())}, raise_on_failure=True)


# `minutes` is a time budget, not what the training is: a finished training is reused whatever the budget says now
# (the pipeline passes its config with the training's budget fields cleared: koala.config.unbudgeted)
TRAINING_CACHE = (INPUTS - "parent_run_id" - "minutes") + TASK_SOURCE + TrainingData()


@task(name="train-drafter", task_run_name="train-{recipe}", tags=["gpu"], retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_unless_koala_error, cache_policy=TRAINING_CACHE, persist_result=True)
def train_drafter(cfg: KoalaConfig, recipe: Recipe, out_dir: str, data_dir: str | None = None,
                  init_from: str | None = None, heldout_dir: str | None = None,
                  parent_run_id: str | None = None, minutes: float | None = None) -> TrainedDrafter:
    """Train a drafter by `recipe`: pretrain (a small LM on text), distill (on the target's samples, from `init_from`
    when given) or heads (KOALA / EAGLE draft heads on the target's features, held out on `heldout_dir`).
    `minutes`: this training's time budget in place of training.max_minutes (the pipeline's share of the run's)."""
    from koala.training import recipes

    if minutes is not None:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_minutes": minutes})})

    s = session_for(cfg.target)
    history: list = []
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)

    def on_log(step: int, metrics: dict) -> None:
        history.append((step, metrics))
        tr.log_metrics(metrics, step=step)

    name = _run_name(cfg, recipe, data_dir)
    log = get_run_logger()  # progress lines (rate, ETA) every PROGRESS_LOG_S: a worker's log is not a terminal
    with Tracker.start(uri, cfg.tracking.experiment, name, parent_run_id=parent_run_id) as tr:
        tr.log_params({"training": cfg.training.model_dump(), "drafter": cfg.drafter.model_dump(),
                       "data_dir": data_dir, "init_from": init_from})
        if recipe == "pretrain":
            path = recipes.pretrain(cfg, s.target, out_dir, resume="auto", on_log=on_log, progress=log.info)
        elif recipe == "distill":
            path = recipes.distill(cfg, s.target, data_dir, out_dir, resume="auto", init_from=init_from,
                                   on_log=on_log, progress=log.info)
        else:
            path = recipes.train_heads(cfg, s.target, data_dir, out_dir, on_log=on_log, progress=log.info,
                                       init_from=init_from, heldout_dir=heldout_dir, resume="auto")
        tr.log_artifact(training_curves(history, Path(out_dir) / f"{recipe}_curves.png", name))
        info = path / ("heads.json" if recipe == "heads" else "koala.json")
        if info.exists():
            tr.log_artifact(info)
        run_id = tr.run_id
    log.info("%s: %s", name, path)
    return TrainedDrafter(spec=f"heads:{path}" if recipe == "heads" else str(path), dir=str(path), run_id=run_id,
                          metrics=history[-1][1] if history else {})


def _run_name(cfg: KoalaConfig, recipe: Recipe, data_dir: str | None) -> str:
    """The MLflow run's name: pretrain, distill-LOSS, or heads-KIND-K<layers>[-adv]-<data source>."""
    if recipe == "pretrain":
        return "pretrain"
    if recipe == "distill":
        return f"distill-{cfg.training.loss}"
    source = (shards.read_manifest(Path(data_dir)) or shards.DatasetManifest()).source
    return f"heads-{cfg.drafter.kind}-K{cfg.drafter.layers}{'-adv' if cfg.training.adversarial else ''}-{source}"
