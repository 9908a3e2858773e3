"""Held-out agreement of a drafter's drafts against training wall time, float32 and bf16 autocast at equal wall time;
writes JSON and a PNG.

Each compute dtype trains the profile's drafter from the same start on the same data for `--minutes` of training
(held-out measurements not counted), measuring held-out greedy agreement of drafts 1..unroll every `--every` steps.

    python bench/dtype_curve.py --data runs/smoke/teacher --minutes 4 --out bench/results/dtype_curve.json \
        --png runs/dtype_curve.png
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from koala import benchinfo
from koala.config import load_config
from koala.precision import ComputeDtype
from koala.targets import load_target
from koala.threads import configure_threads
from koala.training import recipes
from koala.training.data import training_data
from koala.training.loop import train
from koala.training.objectives import heldout_metrics


class _Budget(Exception):
    pass


def curve(cfg, target, data_dir: str, dtype: str, minutes: float, every: int) -> list[dict]:
    """[{step, train_s, agreement by draft}] for one dtype, until `minutes` of training."""
    data = training_data(cfg, target, data_dir, features=True)  # read afresh: the objective takes the features over
    torch.manual_seed(cfg.training.seed)
    heads, kind, _, vocab = recipes._start_heads(cfg, target, cfg.drafter.kind, None, None, data.train.rows)
    objective = recipes._heads_objective(cfg.training, target, kind, heads, data, data_dir, None, vocab)
    compute = ComputeDtype(dtype, "forced by the bench")
    points, clock = [], {"train_s": 0.0, "t": time.perf_counter()}

    def on_log(step, m):
        clock["train_s"] += time.perf_counter() - clock["t"]
        if step % every == 0:
            h = heldout_metrics(objective, data.heldout, target.model.device)  # in float32, as the engine drafts
            points.append({"step": step, "train_s": round(clock["train_s"], 1), "loss": round(m["loss"], 4),
                           "agreement": [round(h.get(f"heldout_greedy_agreement_pos{p}",
                                                     h["heldout_greedy_agreement"]), 4)
                                         for p in range(1, cfg.training.unroll + 1)]})
            print(dtype, points[-1], flush=True)
        if clock["train_s"] > minutes * 60:
            raise _Budget
        clock["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(objective, data.train, cfg.training, tmp, 100_000, on_log=on_log, progress=False, compute=compute)
        except _Budget:
            pass
    return points


def plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from render import draw_dtype_curve  # bench/render.py, beside this script: the docs draw the same plot

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_dtype_curve(ax, result["curves"])
    ax.set_title(f"{result['kind']} head, {result['cpu']} ({result['threads']} threads)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--data", required=True, help="teacher-forced shards with features")
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall time per dtype")
    ap.add_argument("--every", type=int, default=10, help="held-out measurement every N steps")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="config override section.field=value")
    ap.add_argument("--out", default=None)
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    configure_threads()
    cfg = load_config(a.profile, overrides=[*a.set_, "training.checkpoint_every=100000",
                                            "training.eval_every=100000"])
    target = load_target(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    for p in target.model.parameters():
        p.requires_grad_(False)
    result = {**benchinfo.header(), "profile": a.profile, "kind": cfg.drafter.kind, "data": a.data,
              "minutes_per_dtype": a.minutes, "batch_size": cfg.training.batch_size, "unroll": cfg.training.unroll,
              "overrides": a.set_, "curves": {d: curve(cfg, target, a.data, d, a.minutes, a.every)
                                              for d in a.dtypes.split(",")}}
    result["final"] = {d: pts[-1] if pts else None for d, pts in result["curves"].items()}
    benchinfo.write(result, a.out)
    if a.png:
        plot(result, a.png)


if __name__ == "__main__":
    main()
