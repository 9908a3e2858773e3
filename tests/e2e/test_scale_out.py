"""Scale out over a Prefect work pool (docs/guides/scale-out.md), on a real server with two process workers on loopback:
they sample one dataset together, one of them killed with SIGKILL mid-run, and the dataset still completes, every
sample once; then the training stage runs as one torchrun job over two workers ("nodes") of two processes each,
and its weights equal a single process's with the same global batch and seed."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koala_flows.server import free_port, server_env, wait_healthy
from tests.e2e.test_prefect_server import BIN, ROOT, stop_all
from tests.flows.test_pipeline import tiny_config
from tests.koala.data.test_shards import tiny_target_dir  # noqa: F401 - fixture reuse


def processes_of(worker: str) -> list[int]:
    """Pids whose environment has KOALA_WORKER=worker: the worker and the flow runs it started."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"KOALA_WORKER={worker}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def signal_all(worker: str, sig: int) -> list[int]:
    pids = processes_of(worker)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def pause(worker: str, out: Path) -> None:
    """SIGSTOP the worker and its flow run at a moment when it holds neither the claims' nor the manifest's lock
    (a process stopped inside one would block the other worker)."""
    while True:
        signal_all(worker, signal.SIGSTOP)
        free = True
        for name in (".claims.lock", ".manifest.lock"):
            with open(out / name, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    free = False
        if free:
            return
        signal_all(worker, signal.SIGCONT)
        time.sleep(0.05)


def done_entries(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text()).get("done", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_two_workers_sample_one_dataset_then_train_as_two_nodes(tmp_path, tiny_target_dir):  # noqa: F811
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp_path, api, KOALA_HOME=str(ROOT), PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}",
                     PREFECT_WORKER_QUERY_SECONDS="1")  # workers poll every second: both pick up a range at once
    prefect = str(BIN / "prefect")
    logs = {}
    procs = {}

    def start(name, argv, **extra):
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = subprocess.Popen(argv, env={**env, **extra}, cwd=ROOT, stdout=open(logs[name], "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

    def tail(*names):
        return "\n".join(f"--- {n}\n{logs[n].read_text()[-2500:]}" for n in names if n in logs)

    start("server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_healthy(api)
        run = lambda *a: subprocess.run(a, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)  # noqa
        r = run(prefect, "work-pool", "create", "gpu", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run(prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                "sample-shards", "--name", "train-node")
        assert r.returncode == 0, r.stdout + r.stderr
        for w in ("w1", "w2"):  # one flow run at a time each: the two ranges go to two workers
            start(w, [prefect, "worker", "start", "--pool", "gpu", "--name", w, "--limit", "1"], KOALA_WORKER=w)
        cfg = tiny_config(tmp_path, tiny_target_dir, sampling__shard_size=1, sampling__max_new_tokens=16,
                          training__batch_size=4, drafter__draft_vocab=None)
        from tests.koala.data.test_shards import write_prompts

        write_prompts(tmp_path / "p.jsonl", 10, start=6)  # 16 prompts: 16 shards of one prompt
        out = tmp_path / "run" / "data"
        koala = str(BIN / "koala")
        start("parent", [koala, "sample", "--config", str(cfg), "--fan-out", "2"])
        # Interleave the two workers by signals, not by timing (a fast worker would take the other's range over
        # before its run has started): the first to write is paused until the other has written, then the other is
        # killed mid-run with SIGKILL and the first resumes and finishes the dataset.
        first = survivor = killed = None
        killed_at = None
        end = time.time() + 400
        while time.time() < end and procs["parent"].poll() is None:
            done = done_entries(out)
            writers = {e.get("worker") for e in done.values()} & {"w1", "w2"}
            if first is None and writers:
                first = sorted(writers)[0]
                pause(first, out)
            elif first is not None and killed is None and writers - {first}:
                killed = (writers - {first}).pop()
                for pid in processes_of(killed):  # the worker and its flow run, mid-run
                    os.kill(pid, signal.SIGKILL)
                killed_at, survivor = len(done), first
                signal_all(first, signal.SIGCONT)
            time.sleep(0.2)
        if killed is None and first is not None:
            signal_all(first, signal.SIGCONT)
        assert procs["parent"].wait(timeout=60) == 0, tail("parent", "w1", "w2")
        assert killed_at is not None and killed_at < 16, f"no worker killed mid-run: {first=} {killed_at=}"

        # a rerun finds everything done and samples nothing
        r = subprocess.run([koala, "sample", "--config", str(cfg), "--fan-out", "2"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

        from koala.data import shards

        table = shards.load(out, columns=["sample_id", "prompt_id"])  # every shard whole, checksums, no duplicates
        assert table.num_rows == 16 and len(set(table.column("sample_id").to_pylist())) == 16
        assert len(set(table.column("prompt_id").to_pylist())) == 16
        by = [e["worker"] for e in done_entries(out).values()]
        assert by.count("w1") >= 1 and by.count("w2") >= 1, by  # both workers took part
        assert not list(out.glob(".*.claim")) and not list(out.glob(".*.tmp"))  # no claim or partial file left

        # the training stage as one torchrun job over two workers of the pool, two processes each
        start("w3", [prefect, "worker", "start", "--pool", "gpu", "--name", "w3", "--limit", "1"], KOALA_WORKER="w3")
        code = ("from koala_flows.train_nodes import distill_on_nodes; import sys; "
                "print(distill_on_nodes(sys.argv[1], sys.argv[2], config_path=sys.argv[3], steps=3, overrides=["
                "'distributed.nodes=2', 'distributed.procs_per_node=2', 'distributed.rdzv_host=127.0.0.1']))")
        r = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "nodes"), str(cfg)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + tail(survivor, "w3")
        one = subprocess.run([sys.executable, "-m", "koala.cli", "distill", "--config", str(cfg), "--data", str(out),
                              "--out", str(tmp_path / "one"), "--steps", "3", "--no-track"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert one.returncode == 0, one.stderr[-3000:]
        a = load_file(tmp_path / "one" / "drafter" / "model.safetensors")
        b = load_file(tmp_path / "nodes" / "drafter" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
        assert "nnodes=2" in logs[survivor].read_text() and "nnodes=2" in logs["w3"].read_text()  # one node each
        ckpts = sorted(p.name for p in (tmp_path / "nodes" / "checkpoints").iterdir())
        assert ckpts[-1] == "step-0000003"  # rank 0 wrote them
    finally:
        for w in ("w1", "w2"):
            signal_all(w, signal.SIGCONT)  # a paused worker takes no SIGTERM
        stop_all(list(procs.values()))
