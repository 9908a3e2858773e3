"""Training over nodes: a two-"node" torchrun (two processes per node, gloo, 127.0.0.1) distils a drafter whose
weights equal a single-process run with the same global batch and seed; rank 0 alone writes, every rank resumes."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_prefect_server import ROOT, free_port
from tests.flows.test_pipeline import tiny_config
from tests.koala.data.test_shards import tiny_target_dir  # noqa: F401 - fixture reuse


@pytest.fixture
def dataset(tmp_path, tiny_target_dir):  # noqa: F811
    from koala.config import load_config
    from koala.data import build
    from koala.engine.model import Transformer
    from koala.engine.session import Session
    from koala.targets import load_target

    cfg_path = tiny_config(tmp_path, tiny_target_dir, training__batch_size=4, training__checkpoint_every=1,
                           drafter__draft_vocab=None)
    cfg = load_config(path=cfg_path)
    t = load_target(str(tiny_target_dir))
    build.build(cfg, Session(t, Transformer(t.model)), progress=False)
    return cfg_path, cfg.sampling.out_dir


@pytest.mark.slow
def test_two_nodes_of_two_processes_distil_the_weights_of_one_process(tmp_path, dataset):
    cfg, data = dataset
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["distill", "--config", str(cfg), "--data", str(data), "--steps", "3", "--no-track"]

    def run(cmd, **kw):
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400, **kw)

    one = run([sys.executable, "-m", "koala.cli", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]

    def two_nodes(*extra):
        port = free_port()
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                                   f"--node-rank={r}", "--master-addr=127.0.0.1", f"--master-port={port}",
                                   "-m", "koala.cli", *args, "--out", str(tmp_path / "two"), *extra],
                                  env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in (0, 1)]
        outs = [n.communicate(timeout=400)[0] for n in nodes]
        for n, o in zip(nodes, outs):
            assert n.returncode == 0, o[-3000:]

    two_nodes()
    a = load_file(tmp_path / "one" / "drafter" / "model.safetensors")
    b = load_file(tmp_path / "two" / "drafter" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts and ckpts[-1] == "step-0000003"  # written once (rank 0), kept as the loop keeps them
    # every rank of both nodes reads rank 0's checkpoint on resume: the finished training resumes to the same weights
    before = (tmp_path / "two" / "drafter" / "model.safetensors").read_bytes()
    two_nodes("--resume")
    assert (tmp_path / "two" / "drafter" / "model.safetensors").read_bytes() == before
