"""Samples per second of the fanned-out dataset build with 1 worker and with N: prints JSON (docs/guides/scale-out.md).

    python bench/scale_out.py [--workers 1,2] [--prompts 32] [--shard-size 4] [--max-new-tokens 64]
        [--profile smoke] [--out runs/scale_out]

For each worker count: a real Prefect server on 127.0.0.1, a process work pool, that many workers (one flow run at
a time each), the sample-shards deployment, then `koala sample --fan-out W` on the default target into a fresh
directory, timed from start to the dataset's final check. The time includes each flow run's start (a Python process,
the target loaded): that is what a worker pays per range. On a 2-core machine two workers share the two cores, so
expect no gain: the point is that the work is shared, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def config(a, out: Path, data: Path) -> Path:
    from koala.config import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / f"{a.profile}.yaml").read_text())
    cfg["run_dir"] = str(out / "run")
    cfg["prompts"]["limit"] = a.prompts
    cfg["sampling"].update(out_dir=str(data), shard_size=a.shard_size, max_new_tokens=a.max_new_tokens)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one(a, workers: int) -> dict:
    """One measurement: a fresh server, pool and dataset with `workers` workers."""
    from koala_flows.server import free_port, server_env, wait_healthy

    out = Path(a.out) / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(out, api, KOALA_HOME=str(ROOT), PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}",
                     HF_HUB_OFFLINE="1")
    prefect = str(BIN / "prefect")
    procs = [subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        wait_healthy(api)
        for argv in (["work-pool", "create", "gpu", "--type", "process"],
                     ["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "sample-shards"]):
            r = subprocess.run([prefect, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise SystemExit(r.stdout + r.stderr)
        for i in range(workers):
            procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--name", f"w{i}", "--limit",
                                           "1"], env={**env, "KOALA_WORKER": f"w{i}"}, cwd=ROOT,
                                          stdout=open(out / f"w{i}.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        data = out / "data"
        cfg = config(a, out, data)
        t0 = time.perf_counter()
        r = subprocess.run([str(BIN / "koala"), "sample", "--config", str(cfg), "--fan-out", str(workers)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=7200)
        wall = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
        from koala.data import shards

        t = shards.load(data, columns=["sample_id", "response_len"])
        by: dict[str, int] = {}
        for e in shards.read_manifest(data).done.values():
            by[e.worker or "?"] = by.get(e.worker or "?", 0) + 1
        return {"workers": workers, "samples": t.num_rows, "new_tokens": sum(t.column("response_len").to_pylist()),
                "wall_s": round(wall, 1), "samples_per_s": round(t.num_rows / wall, 3),
                "tokens_per_s": round(sum(t.column("response_len").to_pylist()) / wall, 1), "shards_by_worker": by}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main():
    from koala.threads import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--out", default="runs/scale_out")
    a = ap.parse_args()
    rows = [one(a, int(w)) for w in a.workers.split(",")]
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "prompts": a.prompts, "shard_size": a.shard_size,
                      "max_new_tokens": a.max_new_tokens, "profile": a.profile, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
