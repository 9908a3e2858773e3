"""Fan-out over a Prefect work pool: a real server and two process workers sample one dataset together; one worker
is killed with SIGKILL mid-run, and the dataset still completes, every sample once (README: Scale out)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_prefect_server import BIN, ROOT, free_port, wait_healthy
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


def done_entries(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text()).get("done", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_two_workers_sample_one_dataset_and_a_killed_worker_loses_nothing(tmp_path, tiny_target_dir):  # noqa: F811
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
           "KOALA_HOME": str(ROOT), "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("PREFECT_API_KEY", None)
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
                "sample-shards")
        assert r.returncode == 0, r.stdout + r.stderr
        for w in ("w1", "w2"):  # one flow run at a time each: the two ranges go to two workers
            start(w, [prefect, "worker", "start", "--pool", "gpu", "--name", w, "--limit", "1"], KOALA_WORKER=w)
        cfg = tiny_config(tmp_path, tiny_target_dir, sampling__shard_size=1, sampling__max_new_tokens=48)
        from tests.koala.data.test_shards import write_prompts

        write_prompts(tmp_path / "p.jsonl", 18, start=6)  # 24 prompts: 24 shards of one prompt
        out = tmp_path / "run" / "data"
        koala = str(BIN / "koala")
        start("parent", [koala, "sample", "--config", str(cfg), "--fan-out", "2"])
        killed_at = None
        end = time.time() + 400
        while time.time() < end and procs["parent"].poll() is None:
            done = done_entries(out)
            if killed_at is None and any(e.get("worker") == "w2" for e in done.values()):
                for pid in processes_of("w2"):  # the worker and its flow run, mid-run
                    os.kill(pid, signal.SIGKILL)
                killed_at = len(done)
            time.sleep(0.2)
        assert procs["parent"].wait(timeout=60) == 0, tail("parent", "w1", "w2")
        assert killed_at is not None and killed_at < 24, f"w2 never wrote, or wrote after the end: {killed_at}"

        # a rerun finds everything done and samples nothing
        r = subprocess.run([koala, "sample", "--config", str(cfg), "--fan-out", "2"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

        from koala.data import shards

        table = shards.load(out, columns=["sample_id", "prompt_id"])  # every shard whole, checksums, no duplicates
        assert table.num_rows == 24 and len(set(table.column("sample_id").to_pylist())) == 24
        assert len(set(table.column("prompt_id").to_pylist())) == 24
        by = [e["worker"] for e in done_entries(out).values()]
        assert by.count("w1") >= 1 and by.count("w2") >= 1, by  # both workers took part
        assert not list(out.glob(".*.claim")) and not list(out.glob(".*.tmp"))  # no claim or partial file left
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
