"""A real Prefect server and process worker on localhost run the deployed pipeline (deployments/prefect.yaml)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from koala_flows.server import free_port, server_env, wait_healthy
from tests.flows.test_pipeline import tiny_config
from tests.koala.data.test_shards import tiny_target_dir  # noqa: F401 - fixture reuse

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STOP_GRACE_S = 5.0  # a Prefect worker asked to stop can take longer than its test; by then its work is checked


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process's group (each started with start_new_session), one shared grace period, then SIGKILL
    every group: a leader that exited may leave what it started running."""
    def send(p, sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    for p in procs:
        send(p, signal.SIGTERM)
    end = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        send(p, signal.SIGKILL)
        p.wait()


STATUS_SCRIPT = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs()
        print(json.dumps([{"id": str(r.id), "state": r.state.name, "pool": r.work_pool_name,
                           "deployment_id": str(r.deployment_id)} for r in runs if r.deployment_id]))
asyncio.run(main())
"""


@pytest.mark.slow
def test_worker_runs_the_deployed_pipeline(tmp_path, tiny_target_dir):  # noqa: F811
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp_path, api, KOALA_HOME=str(ROOT), PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}")
    prefect = str(BIN / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # stopped with the processes it starts
    worker = None
    try:
        wait_healthy(api)
        run = lambda *a, **kw: subprocess.run(a, env=env, cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                              timeout=kw.get("timeout", 300))
        r = run(prefect, "work-pool", "create", "gpu", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run(prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "on-demand")
        assert r.returncode == 0, r.stdout + r.stderr
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--name", "test-worker"], env=env,
                                  cwd=ROOT, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        cfg = tiny_config(tmp_path, tiny_target_dir)
        params = json.dumps({"config_path": str(cfg)})
        r = run(prefect, "deployment", "run", "koala-pipeline/on-demand", "--params", params, "--watch",
                "--watch-timeout", "600", timeout=700)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        runs = json.loads(run(sys.executable, "-c", STATUS_SCRIPT).stdout)
        assert len(runs) == 1 and runs[0]["state"] == "Completed" and runs[0]["pool"] == "gpu"
        log = (tmp_path / "worker.log").read_text()
        assert runs[0]["id"] in log  # this worker picked it up and ran it

        from mlflow import MlflowClient

        from koala.config import load_config
        from koala.tracking import resolve_uri
        c = load_config(path=cfg)
        client = MlflowClient(resolve_uri(None, c.run_dir))
        name = "koala-drafter-" + Path(c.target.spec).name
        versions = client.search_model_versions(f"name='{name}'")
        assert len(versions) == 1
        v = versions[0]
        assert client.get_experiment_by_name("koala-test") is not None
        promoted = v.tags["promoted"] == "true"
        assert promoted == (float(v.tags["speedup_ci95_low"]) > 1.0)  # the rule: the interval's lower bound
        if promoted:
            assert str(client.get_model_version_by_alias(name, "champion").version) == str(v.version)
    finally:
        stop_all([p for p in (worker, server) if p is not None])
