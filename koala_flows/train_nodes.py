"""The training stage over several workers of a pool: one torchrun job, one `train-node` flow run per node.

The parent (the pipeline's run, or `distill_on_nodes` run by hand) hosts the job's rendezvous store (torchrun's c10d
backend) on its own host, starts `distributed.nodes` runs of the `train-node` deployment, and waits. Each node run,
on whichever worker takes it, launches `torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint
HOST:PORT -m koala.cli distill ...`; torchrun assigns the ranks, rank 0 writes the checkpoints and the drafter. The
nodes must share out_dir and the data (a network file system), as they share the dataset in the fanned-out build.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import yaml
from prefect import flow

from koala.errors import KoalaError
from koala.report import TrainedDrafter
from koala_tasks.common import resolve_config


@flow(name="train-node", log_prints=True)
def train_on_node(argv: list[str], nnodes: int, procs_per_node: int, rdzv_endpoint: str, rdzv_id: str) -> int:
    """One node of a multi-node training: torchrun joins the job's rendezvous and runs `koala.cli ARGV` on this
    worker's `procs_per_node` processes; returns torchrun's exit status (non-zero fails the run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={procs_per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
           "--rdzv-conf=is_host=0", "-m", "koala.cli", *argv]  # is_host=0: the parent holds the store
    print(" ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode:
        raise RuntimeError(f"torchrun exited with status {r.returncode} on {socket.gethostname()}")
    return r.returncode


@flow(name="distill-on-nodes", log_prints=True)
def distill_on_nodes(data_dir: str, out_dir: str, profile: str | None = "smoke", config_path: str | None = None,
                     overrides: list[str] | None = None, init_from: str | None = None, loss: str | None = None,
                     steps: int | None = None) -> TrainedDrafter:
    """Distil the drafter as one torchrun job over `distributed.nodes` workers of the pool; returns what the one-node
    training task does (the drafter is out_dir/drafter, written by rank 0)."""
    cfg = resolve_config(profile, config_path, overrides)
    d = cfg.distributed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "distributed-config.yaml"  # what every node reads: the resolved config, on the shared disk
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # --auto-resume: a rerun goes on where the last stopped; another training's checkpoints are set aside
    argv = ["distill", "--config", str(cfg_file), "--data", str(Path(data_dir).resolve()), "--out", str(out.resolve()),
            "--no-track", "--auto-resume",
            *(["--init", str(init_from)] if init_from else []), *(["--loss", loss] if loss else []),
            *(["--steps", str(steps)] if steps else [])]
    host = d.rdzv_host or os.environ.get("KOALA_RDZV_HOST") or socket.getfqdn()
    with _rendezvous_store(d.rdzv_port) as port:
        endpoint = f"{host}:{port}"
        params = dict(argv=argv, nnodes=d.nodes, procs_per_node=d.procs_per_node, rdzv_endpoint=endpoint,
                      rdzv_id=uuid.uuid4().hex[:12])
        from koala_flows.fanout import start_runs, wait_runs

        runs = start_runs(d.deployment, [params] * d.nodes, [f"node-{i}" for i in range(d.nodes)])
        print(f"{d.nodes} nodes x {d.procs_per_node} processes, rendezvous {endpoint}: {[r.name for r in runs]}")
        ended = wait_runs(runs, desc="nodes", fail_fast=True, start_timeout_s=600)
    failed = {n: s for n, s in ended.items() if s != "Completed"}
    if failed:
        raise KoalaError(f"the training stage failed on {sorted(failed)} ({failed}): see those flow runs' logs; a rerun "
                         f"resumes from the last checkpoint in {out}")
    info = json.loads((out / "drafter" / "koala.json").read_text())
    return TrainedDrafter(spec=str(out / "drafter"), dir=str(out / "drafter"), metrics=info.get("metrics", {}))


@contextmanager
def _rendezvous_store(port: int):
    """The c10d rendezvous store of one job, served by this process while the nodes run; yields its port (0: the OS
    picks a free one)."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=30))
    except (RuntimeError, OSError) as e:
        raise KoalaError(f"distributed.rdzv_port {port}: cannot serve the rendezvous there ({e}): choose a free port, "
                         "or 0") from None
    try:
        yield store.port
    finally:
        del store
