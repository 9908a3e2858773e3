"""Flow: train a drafter (optional pretraining, then distillation on the target's samples)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.common import resolve_config
from tasks.training import distill_drafter, pretrain_drafter


@flow(name="train-drafter", log_prints=True)
def train_drafter(
    profile: str = "smoke",
    config_path: str | None = None,
    data_dir: str | None = None,
    out_dir: str | None = None,
    loss: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Pretrain (when training.pretrain_steps > 0) and distil a drafter; returns the drafter directory.

    Args:
        profile: configs/NAME.yaml, unless config_path is given.
        config_path: a YAML config file.
        data_dir: the distillation set (default: sampling.out_dir).
        out_dir: where checkpoints and the drafter go (default: training.out_dir).
        loss: fkl, rkl, tvd, tvdpp or jsd (default: training.loss).
        overrides: more `section.field=value` settings.
    """
    cfg = resolve_config(profile, config_path, overrides)
    data = data_dir or cfg.sampling.out_dir
    out = Path(out_dir or cfg.training.out_dir)

    # Step 1: pretrain on text (optional).
    init = pretrain_drafter(cfg, str(out / "pretrain")) if cfg.training.pretrain_steps > 0 else None

    # Step 2: distil on the target's own responses.
    result = distill_drafter(cfg, data, str(out / "distill"), init_from=init, loss=loss)
    print(f"drafter: {result['drafter']}")
    return result["drafter"]
