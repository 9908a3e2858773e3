import json

import pytest

from koala.data import shards
from tests.koala.data.test_shards import tiny_target_dir, write_prompts  # noqa: F401 - fixture reuse


@pytest.mark.slow
def test_flow_builds_and_reuses_shards(tmp_path, tiny_target_dir):  # noqa: F811
    from prefect import get_client

    from koala_flows.build_dataset import build_distillation_dataset

    write_prompts(tmp_path / "p.jsonl", 5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "target": {"spec": str(tiny_target_dir)},
        "prompts": {"source": str(tmp_path / "p.jsonl")},
        "sampling": {"out_dir": str(tmp_path / "ds"), "shard_size": 2, "max_new_tokens": 8, "batch_size": 2},
    }))
    import anyio

    async def sample_runs():
        async with get_client() as c:
            return [r for r in await c.read_task_runs() if r.name.startswith("sample-shard")]

    earlier = {r.id for r in anyio.run(sample_runs)}  # other tests' runs on this session's server

    def task_states():
        return [(r.name, r.state.name) for r in anyio.run(sample_runs) if r.id not in earlier]

    out = build_distillation_dataset(config_path=str(cfg))
    assert out == str(tmp_path / "ds")
    assert shards.load(out).num_rows == 5
    mtimes = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ds").glob("shard-*.parquet")}
    assert len(mtimes) == 3

    # Second run: every shard is cached or skipped, none rewritten.
    build_distillation_dataset(config_path=str(cfg))
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ds").glob("shard-*.parquet")} == mtimes

    states = task_states()
    assert len(states) == 6 and sum(s == "Cached" for _, s in states) == 3

    # A shard damaged by hand is regenerated despite the cache; the others stay cached.
    f = tmp_path / "ds" / "shard-00001.parquet"
    f.write_bytes(b"garbage")
    build_distillation_dataset(config_path=str(cfg))
    assert shards.load(out).num_rows == 5
    states = task_states()
    assert len(states) == 9 and sum(s == "Cached" for _, s in states) == 5


def test_a_shard_another_process_writes_is_named_and_the_manifest_records_the_out_used(tmp_path,
                                                                                       tiny_target_dir):  # noqa: F811
    """Two `koala sample` runs into one new --out: the one that finds a shard claimed by the other (alive) says
    which process writes which shard, not that shards are corrupt; the manifest names the --out written."""
    import socket
    import subprocess
    import sys

    from koala.errors import KoalaError
    from koala_flows.build_dataset import build_distillation_dataset

    write_prompts(tmp_path / "p.jsonl", 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"target": {"spec": str(tiny_target_dir)}, "prompts": {"source": str(tmp_path / "p.jsonl")},
                               "sampling": {"shard_size": 2, "max_new_tokens": 4, "batch_size": 2}}))
    out = tmp_path / "new-out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the other, live writer
    try:
        (out / ".shard-00000.parquet.claim").write_text(json.dumps(
            {"worker": "other-run", "host": socket.gethostname(), "pid": other.pid, "since": 0}))
        with pytest.raises(KoalaError, match="another process \\(other-run\\) is writing shard-00000.parquet: let it "
                                             "finish"):
            build_distillation_dataset(config_path=str(cfg), out_dir=str(out))
    finally:
        other.kill()
    assert shards.read_manifest(out).sampling["out_dir"] == str(out)
    build_distillation_dataset(config_path=str(cfg), out_dir=str(out))  # the other is gone: its shard is taken over
    assert shards.load(out).num_rows == 2
