"""Distillation shards: schema, resumability after SIGKILL, corruption, incremental runs, top-k fidelity."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from koala.config import KoalaConfig
from koala.data import build, shards
from koala.errors import KoalaError
from koala.engine.model import Transformer
from koala.engine.session import Session
from koala.targets import load_target

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory, default_target):
    """A tiny random Llama with the default target's tokenizer: a fast stand-in target on disk."""
    from tests.conftest import tiny_llama

    d = tmp_path_factory.mktemp("tiny_target")
    tiny_llama(layers=2, vocab=default_target.info.vocab_size, hidden=32, init_std=0.05).save_pretrained(d)
    default_target.tokenizer.save_pretrained(d)
    return d


def write_prompts(path: Path, n: int, start: int = 0):
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"prompt": f"Tell me fact number {i} about koalas.", "category": "koala"}) + "\n")


def make_cfg(target_dir, prompts, out, **sampling) -> KoalaConfig:
    s = {"out_dir": str(out), "shard_size": 3, "max_new_tokens": 12, "batch_size": 4, "temperature": 0.8, **sampling}
    return KoalaConfig.model_validate({"target": {"spec": str(target_dir)},
                                       "prompts": {"source": str(prompts), "max_prompt_tokens": 200}, "sampling": s})


@pytest.fixture
def session(tiny_target_dir):
    t = load_target(str(tiny_target_dir))
    return Session(t, Transformer(t.model))


def test_schema_and_metadata(tmp_path, session, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 5)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds", topk_logprobs=3)
    build.build(cfg, session, progress=False)
    files = sorted((tmp_path / "ds").glob("shard-*.parquet"))
    assert len(files) == 2
    t = pq.read_table(files[0])
    expected = [f.name for f in shards.SCHEMA] + ["topk_ids", "topk_logprobs"]
    assert t.column_names == expected
    assert str(t.schema.field("input_ids").type) == "list<element: int32>"
    assert str(t.schema.field("topk_logprobs").type) == "list<element: list<element: halffloat>>"
    row = t.to_pylist()[0]
    assert len(row["input_ids"]) == row["prompt_len"] + row["response_len"]
    assert len(row["topk_ids"]) == row["response_len"] and len(row["topk_ids"][0]) == 3
    meta = shards.metadata(tmp_path / "ds")
    assert meta["target"]["content_hash"] == session.target.info.content_hash
    assert meta["chat_template_hash"] == session.target.info.chat_template_hash
    assert meta["sampling"]["temperature"] == 0.8 and meta["koala_version"]
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert shards.load(tmp_path / "ds").num_rows == 5


def test_topk_logprobs_match_a_direct_forward(tmp_path, session, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds", topk_logprobs=5)
    build.build(cfg, session, progress=False)
    model = session.target.model
    for row in shards.load(tmp_path / "ds").to_pylist():
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        P = row["prompt_len"]
        for j in range(row["response_len"]):
            want = lp[P - 1 + j].topk(5)
            assert row["topk_ids"][j] == want.indices.tolist()
            assert torch.allclose(torch.tensor(row["topk_logprobs"][j]), want.values, atol=2e-2, rtol=1e-3)


def test_same_seed_reproduces_a_sample(tmp_path, session, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 4)
    a = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "a")
    again = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "again")
    other = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "b", batch_size=1, shard_size=1)
    for c in (a, again, other):
        build.build(c, session, progress=False)
    key = lambda r: r["sample_id"]  # noqa: E731
    ra, r2, rb = (sorted(shards.load(tmp_path / d).to_pylist(), key=key) for d in ("a", "again", "b"))
    assert [r["input_ids"] for r in ra] == [r["input_ids"] for r in r2]  # same seeds, same samples
    # sample ids do not depend on batching; tokens match up to float differences between batch shapes
    assert [r["sample_id"] for r in ra] == [r["sample_id"] for r in rb]
    assert ra[0]["input_ids"][:ra[0]["prompt_len"] + 3] == rb[0]["input_ids"][:rb[0]["prompt_len"] + 3]


def test_corrupted_shard_is_regenerated(tmp_path, session, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 6)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    build.build(cfg, session, progress=False)
    f = tmp_path / "ds" / "shard-00001.parquet"
    f.write_bytes(f.read_bytes()[:-100])  # truncated by hand
    with pytest.raises(KoalaError, match="missing or corrupt"):
        shards.load(tmp_path / "ds")
    p = build.build(cfg, session, progress=False)
    assert [s.file for s in p.todo] == ["shard-00001.parquet"]
    assert shards.load(tmp_path / "ds").num_rows == 6


def test_incremental_run_samples_only_new_prompts(tmp_path, session, tiny_target_dir):
    logs = tmp_path / "logs"
    logs.mkdir()
    write_prompts(logs / "day1.jsonl", 4)
    cfg = make_cfg(tiny_target_dir, logs, tmp_path / "ds")
    build.build(cfg, session, progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ds").glob("shard-*.parquet")}
    write_prompts(logs / "day2.jsonl", 2, start=100)
    write_prompts(logs / "day2.jsonl", 1, start=0)  # a repeat of an old prompt is not sampled again
    p = build.build(cfg, session, progress=False)
    assert len(p.todo) == 1 and len(p.todo[0].prompt_ids) == 2
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "ds").glob("shard-*.parquet")}
    assert all(after[k] == v for k, v in before.items())  # old shards untouched
    rows = shards.load(tmp_path / "ds").to_pylist()
    assert len(rows) == 6 and len({r["sample_id"] for r in rows}) == 6


def test_other_target_directory_is_refused(tmp_path, session, tiny_target_dir, default_target):
    write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    build.build(cfg, session, progress=False)
    with pytest.raises(KoalaError, match="holds data made with target"):
        build.plan(cfg, default_target, tmp_path / "ds")


def test_empty_prompt_set_and_too_long_prompts(tmp_path, session, tiny_target_dir):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "word " * 500}) + "\n")
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    # the tiny target's context is 256 tokens: the prompt is skipped and counted, and nothing is left
    with pytest.raises(KoalaError, match="no prompts left.*longer_than_context"):
        build.plan(cfg, session.target)
    write_prompts(tmp_path / "p.jsonl", 2)
    p = build.plan(cfg, session.target)
    assert p.skipped == {"longer_than_context": 1} and len(p.records) == 2


def test_disk_full_removes_partial_file_and_keeps_manifest(tmp_path, session, tiny_target_dir, monkeypatch):
    write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    p = build.plan(cfg, session.target)
    manifest = (tmp_path / "ds" / "manifest.json").read_text()

    def full_disk(table, where, **kw):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.pq, "write_table", full_disk)
    with pytest.raises(KoalaError, match="No space left on device.*free disk space"):
        build.sample_shard(cfg, session.target, session.engine, p.todo[0], p.records, p.out_dir, session.eos_ids,
                           progress=False)
    assert not list((tmp_path / "ds").glob("*.parquet")) and not list((tmp_path / "ds").glob(".*.tmp"))
    assert (tmp_path / "ds" / "manifest.json").read_text() == manifest


KILL_SCRIPT = """
import sys
from koala.config import KoalaConfig
from koala.data import build
from koala.engine.model import Transformer
from koala.engine.session import Session
from koala.targets import load_target
cfg = KoalaConfig.model_validate_json(sys.argv[1])
t = load_target(cfg.target.spec)
build.build(cfg, Session(t, Transformer(t.model)), progress=False)
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 24)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds", shard_size=2, max_new_tokens=48,
                   batch_size=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json()], env=env)
    manifest = tmp_path / "ds" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        m = shards.read_manifest(tmp_path / "ds") if manifest.exists() else None
        if m and len(m.done) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(shards.read_manifest(tmp_path / "ds").done)
    assert 2 <= done_at_kill < 12, "the kill must land in the middle of the run"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json()], env=env, check=True)
    m = shards.read_manifest(tmp_path / "ds")
    assert len(m.plan) == 12 and len(m.done) == 12
    rows = shards.load(tmp_path / "ds").to_pylist()  # verifies every checksum
    assert len(rows) == 24 and len({r["sample_id"] for r in rows}) == 24
    assert not list((tmp_path / "ds").glob(".*.tmp"))


def _edit_manifest(out: Path, fn) -> None:
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,match", [
    (lambda m: m["plan"].pop(0), "records shard-00000.parquet as done but its plan has no such shard"),
    (lambda m: m["plan"][1]["prompt_ids"].append(m["plan"][0]["prompt_ids"][0]), "plans prompt .* in shard-00000"),
    (lambda m: m["plan"].append(dict(m["plan"][0])), "plans shard-00000.parquet twice"),
])
def test_an_edited_plan_is_refused_not_sampled_twice(tmp_path, session, tiny_target_dir, damage, match):
    """A plan koala cannot have written (a shard's entry removed, a prompt planned twice) would make `koala sample`
    sample prompts again under new shard numbers: refused, by the next run and by every reader, nothing rewritten."""
    write_prompts(tmp_path / "p.jsonl", 6)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    build.build(cfg, session, progress=False)
    _edit_manifest(tmp_path / "ds", damage)
    before = (tmp_path / "ds" / "manifest.json").read_text()
    with pytest.raises(KoalaError, match=match):
        build.build(cfg, session, progress=False)
    with pytest.raises(KoalaError, match=match):
        shards.load(tmp_path / "ds")
    assert (tmp_path / "ds" / "manifest.json").read_text() == before
    assert len(list((tmp_path / "ds").glob("shard-*.parquet"))) == 2


def test_rows_are_checked_against_the_manifest_and_sample_ids_are_unique(tmp_path, session, tiny_target_dir):
    write_prompts(tmp_path / "p.jsonl", 6)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    build.build(cfg, session, progress=False)
    ds = tmp_path / "ds"
    # a shard copied over another (checksums re-recorded, as a careless repair would): its samples appear twice
    (ds / "shard-00001.parquet").write_bytes((ds / "shard-00000.parquet").read_bytes())
    _edit_manifest(ds, lambda m: m["done"]["shard-00001.parquet"].update(
        sha256=shards.sha256_file(ds / "shard-00001.parquet")))
    with pytest.raises(KoalaError, match="shard-00001.parquet holds prompt .* which its plan does not list"):
        shards.load(ds)
    _edit_manifest(ds, lambda m: m["plan"][1].update(prompt_ids=m["plan"][0]["prompt_ids"] + ["x"]))
    _edit_manifest(ds, lambda m: m["plan"][0].update(prompt_ids=["y"] + m["plan"][0]["prompt_ids"]))
    with pytest.raises(KoalaError, match="plans prompt"):
        shards.load(ds)


def test_new_shards_never_reuse_a_number(tmp_path, session, tiny_target_dir):
    """Numbers come after every shard planned, recorded or on disk, not from the plan's length."""
    write_prompts(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "ds")
    build.build(cfg, session, progress=False)
    (tmp_path / "ds" / "shard-00007.parquet").write_bytes(b"left by someone")
    write_prompts(tmp_path / "p.jsonl", 3, start=3)
    p = build.build(cfg, session, progress=False)
    assert [s.index for s in p.shards] == [0, 8]
    assert shards.load(tmp_path / "ds").num_rows == 6


HOLD = """
import sys, time
from pathlib import Path
from koala.data.claims import claim
with claim(Path(sys.argv[1]), "shard-00000.parquet") as holder:
    print("held" if holder is None else "taken", flush=True)
    time.sleep(120)
"""


def test_one_process_holds_a_shard_and_a_killed_holders_shard_is_taken_over(tmp_path):
    import subprocess
    import sys

    from koala.data.claims import claim

    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with claim(tmp_path, "shard-00000.parquet") as holder:
            assert holder is not None and holder["pid"] == p.pid  # live: left to it
        (tmp_path / ".shard-00000.parquet.abc.tmp").write_text("a partial write")
    finally:
        p.kill()  # SIGKILL: no cleanup runs
        p.wait()
    assert (tmp_path / ".shard-00000.parquet.claim").exists()
    with claim(tmp_path, "shard-00000.parquet") as holder:
        assert holder is None  # the dead holder's claim is stale: taken over
        assert not (tmp_path / ".shard-00000.parquet.abc.tmp").exists()  # and its partial write removed
    assert not (tmp_path / ".shard-00000.parquet.claim").exists()  # released on exit


def test_a_claim_from_another_host_is_live_while_its_heartbeat_is_fresh(tmp_path):
    import os
    import time

    from koala.data.claims import claim

    path = tmp_path / ".shard-00001.parquet.claim"
    path.write_text(json.dumps({"worker": "w9", "host": "another-host", "pid": 1, "since": 0}))
    with claim(tmp_path, "shard-00001.parquet", lease_s=60) as holder:
        assert holder["worker"] == "w9"
    old = time.time() - 120
    os.utime(path, (old, old))
    with claim(tmp_path, "shard-00001.parquet", lease_s=0.4) as holder:
        assert holder is None
        t0 = path.stat().st_mtime
        time.sleep(0.5)
        assert path.stat().st_mtime > t0  # our heartbeat keeps it fresh for workers on other hosts
