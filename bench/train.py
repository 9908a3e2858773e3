"""Training throughput of a profile's drafter in float32 and bf16 autocast side by side, one run; prints JSON.

Trained (response) tokens per second of the training loop's steps, as `koala heads` / `koala distill` run them,
with the compute dtype forced for each measurement; model FLOPs utilisation on a GPU.

    python bench/train.py --kind eagle --data runs/smoke/teacher [--steps 8] [--dtypes float32,bfloat16]
    python bench/train.py --kind draft_model --data runs/smoke/data
    python bench/train.py --kind eagle --device cuda --peak-tflops 989 --out bench/results/train-gpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from koala import benchinfo
from koala.config import load_config
from koala.models.draft_model import build_drafter
from koala.precision import ComputeDtype, resolve
from koala.targets import load_target
from koala.threads import configure_threads
from koala.training import recipes
from koala.training.data import training_data
from koala.training.loop import train
from koala.training.objectives import Distill


def objective_for(cfg, target, kind: str, data, data_dir: str):
    """The objective `koala heads` or `koala distill` would train, and the module whose parameters it trains."""
    if kind == "draft_model":
        model = build_drafter(target, cfg.drafter)
        return Distill(model, cfg.training.loss, target.model, cfg=cfg.training), model
    for p in target.model.parameters():
        p.requires_grad_(False)
    heads, kind, _, vocab = recipes._start_heads(cfg, target, kind, None, None, data.train.rows)
    return recipes._heads_objective(cfg.training, target, kind, heads, data, data_dir, None, vocab), heads


def measure(cfg, target, kind: str, data_dir: str, compute: ComputeDtype, steps: int) -> dict:
    data = training_data(cfg, target, data_dir, features=kind != "draft_model")
    objective, model = objective_for(cfg, target, kind, data, data_dir)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train(objective, data.train, cfg.training, tmp, 2, progress=False, compute=compute)  # warm-up (compiles)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        train(objective, data.train, cfg.training, tmp + "/b", steps, on_log=lambda s, m: log.append(m),
              progress=False, compute=compute)
        wall = time.perf_counter() - t
    tps = sorted(m["tokens_per_s"] for m in log)[len(log) // 2]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"compute_dtype": compute.name, "reason": compute.reason, "warmup_s": round(warm, 1),
            "wall_s": round(wall, 2), "steps": steps, "tokens_per_s": round(tps, 1),
            "params_trainable": trainable}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="default")
    ap.add_argument("--kind", default="eagle", choices=["draft_model", "medusa", "eagle", "eagle3"])
    ap.add_argument("--data", default=None, help="shards to train on (default: the profile's teacher-forced set "
                    "for heads, its sampled set for draft_model)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes measured, in this order")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", dest="set_", action="append", default=[], help="config override section.field=value")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (H100 SXM bf16 dense: 989)")
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. bench/results/train.json)")
    a = ap.parse_args()
    configure_threads()
    over = [f"target.device={a.device}"] if a.device else []
    if a.device and a.device.startswith("cuda"):
        over.append("target.dtype=float32")  # float32 master weights; the compute dtype is what is measured
    cfg = load_config(a.profile, overrides=over + a.set_ + [
        f"drafter.kind={a.kind}", f"training.checkpoint_every={a.steps + 3}", f"training.eval_every={a.steps + 3}"])
    target = load_target(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    data_dir = a.data or (cfg.sampling.out_dir if a.kind == "draft_model" else cfg.teacher_forced.out_dir)
    c = target.model.config
    auto = resolve("auto", target.model.device, c.hidden_size, c.intermediate_size, c.vocab_size)
    runs = [measure(cfg, target, a.kind, data_dir, ComputeDtype(d, "forced by the bench"), a.steps)
            for d in a.dtypes.split(",")]
    out = {**benchinfo.header(), "profile": a.profile, "kind": a.kind, "data": data_dir,
           "device": str(target.model.device), "batch_size": cfg.training.batch_size,
           "max_seq_len": cfg.training.max_seq_len, "unroll": cfg.training.unroll,
           "draft_vocab": cfg.drafter.draft_vocab, "overrides": a.set_, "auto_choice": auto.to_dict(),
           "runs": runs}
    if len(runs) > 1:
        out["speedup_over_first"] = round(runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"], 2)
    if target.model.device.type == "cuda":  # forward + backward ~ 6 FLOPs per trainable parameter per token
        for r in runs:
            r["mfu"] = round(r["tokens_per_s"] * 6 * r["params_trainable"] / (a.peak_tflops * 1e12), 4)
    benchinfo.write(out, a.out)


if __name__ == "__main__":
    main()
