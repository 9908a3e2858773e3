"""Training throughput of the smoke drafter (response tokens/s; model FLOPs utilisation on a GPU); prints JSON.

    python bench/train.py [--data runs/smoke/data] [--steps 10] [--device cpu|cuda] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from koala.config import load_config
from koala.models.draft_model import build_drafter
from koala.targets import load_target
from koala.threads import cpu_model
from koala.training.data import training_data
from koala.training.loop import train
from koala.training.objectives import Distill


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (H100 SXM bf16 dense: 989)")
    a = ap.parse_args()
    over = [f"target.device={a.device}"] if a.device else []
    if a.device == "cuda":
        over.append("target.dtype=float32")  # weights fp32, compute under bf16 autocast
    cfg = load_config(a.profile, overrides=over + [f"training.checkpoint_every={a.steps + 1}",
                                                   f"training.eval_every={a.steps + 1}"])
    target = load_target(cfg.target.spec, cfg.target.dtype, cfg.target.device)
    data = training_data(cfg, target, a.data or cfg.sampling.out_dir).train
    model = build_drafter(target, cfg.drafter)
    objective = Distill(model, cfg.training.loss, target.model, cfg=cfg.training)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        train(objective, data, cfg.training, tmp, 2, progress=False)  # warm-up
        t = time.perf_counter()
        train(objective, data, cfg.training, tmp + "/b", a.steps, on_log=lambda s, m: log.append(m), progress=False)
        wall = time.perf_counter() - t
    tps = sum(m["tokens_per_s"] for m in log) / len(log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # forward + backward ~ 6 FLOPs per trainable parameter per token, ~4 per frozen one (no weight gradient)
    flops_per_token = 6 * trainable + 4 * (total - trainable)
    dev = next(model.parameters()).device
    out = {"profile": a.profile, "device": str(dev), "cpu": cpu_model(), "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "autocast": "bfloat16" if dev.type == "cuda" else None,
           "drafter_layers": cfg.drafter.layers, "params_trainable": trainable, "params_total": total,
           "loss": cfg.training.loss, "batch_size": cfg.training.batch_size, "steps": a.steps,
           "wall_s": round(wall, 2), "response_tokens_per_s": round(tps, 1),
           "model_tflops": round(tps * flops_per_token / 1e12, 4)}
    if out["device"].startswith("cuda"):
        out["mfu"] = round(out["model_tflops"] / a.peak_tflops, 4)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
