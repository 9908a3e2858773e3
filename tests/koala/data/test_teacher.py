"""Teacher-forced shards: schema, top-k and features equal to a direct forward, resume after a failure, old shards."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from koala.config import KoalaConfig
from koala.data import build, shards, teacher
from tests.koala.data.test_shards import session, tiny_target_dir  # noqa: F401 - fixture reuse


def write_chats(path: Path, n: int, with_answer: bool = True, start: int = 0):
    with open(path, "a") as f:
        for i in range(start, start + n):
            row = {"prompt": f"Tell me fact number {i} about koalas.", "category": "koala"}
            if with_answer:
                row["response"] = f"Koalas sleep about {10 + i} hours a day, and fact {i} is that they eat leaves."
            f.write(json.dumps(row) + "\n")


def make_cfg(target_dir, prompts, out, **forced) -> KoalaConfig:
    tf = {"limit": 100, "out_dir": str(out), "shard_size": 3, "batch_size": 2, "topk_logprobs": 5, **forced}
    return KoalaConfig.model_validate({"target": {"spec": str(target_dir)},
                                       "prompts": {"source": str(prompts), "max_prompt_tokens": 200},
                                       "teacher_forced": tf})


def test_schema_topk_and_features_equal_a_direct_forward(tmp_path, session, tiny_target_dir):
    write_chats(tmp_path / "p.jsonl", 5)
    write_chats(tmp_path / "p.jsonl", 1, with_answer=False, start=50)  # a prompt without an answer has nothing to force
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "tf", features=True)
    p = build.build(cfg, session, progress=False, source="teacher_forced")
    assert p.skipped == {"no_answer": 1}
    files = sorted((tmp_path / "tf").glob("shard-*.parquet"))
    assert len(files) == 2
    t = pq.read_table(files[0])
    assert t.column_names == [f.name for f in shards.SCHEMA] + ["topk_ids", "topk_logprobs", "features"]
    assert shards.read_manifest(tmp_path / "tf").source == "teacher_forced"
    model = session.target.model
    rows = shards.load(tmp_path / "tf").to_pylist()
    assert len(rows) == 5
    for row in rows:
        assert row["source"] == "teacher_forced" and row["prompt_source"] == "p"
        assert "Koalas sleep" in row["response_text"]
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0]
            lp = torch.log_softmax(model.lm_head(h).float(), -1)
        P = row["prompt_len"]
        assert len(row["topk_ids"]) == row["response_len"] == len(row["input_ids"]) - P
        for j in range(row["response_len"]):
            want = lp[P - 1 + j].topk(5)
            assert row["topk_ids"][j] == want.indices.tolist()
            assert torch.allclose(torch.tensor(row["topk_logprobs"][j]), want.values, atol=2e-2, rtol=1e-3)
        f = teacher.features_of(row, model.config.hidden_size)
        assert f.shape == h.shape and torch.allclose(f.float(), h, atol=1e-2, rtol=1e-2)


def test_a_failure_mid_run_resumes_with_the_shards_already_written(tmp_path, session, tiny_target_dir, monkeypatch):
    write_chats(tmp_path / "p.jsonl", 7)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "tf", shard_size=3, batch_size=3)
    real, calls = teacher.force_batch, []

    def dies_on_the_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a user's Ctrl-C in the middle of shard 2
        return real(*a, **kw)

    monkeypatch.setattr(teacher, "force_batch", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build.build(cfg, session, progress=False, source="teacher_forced")
    done = shards.read_manifest(tmp_path / "tf").done
    assert list(done) == ["shard-00000.parquet"]
    first = (tmp_path / "tf" / "shard-00000.parquet").stat().st_mtime_ns
    monkeypatch.setattr(teacher, "force_batch", real)
    p = build.build(cfg, session, progress=False, source="teacher_forced")
    assert [s.file for s in p.todo] == ["shard-00001.parquet", "shard-00002.parquet"]
    assert (tmp_path / "tf" / "shard-00000.parquet").stat().st_mtime_ns == first
    assert shards.load(tmp_path / "tf").num_rows == 7
    assert build.plan(cfg, session.target, source="teacher_forced").todo == []  # a third run has nothing to do


def test_teacher_forced_and_sampled_data_never_share_a_directory(tmp_path, session, tiny_target_dir):
    write_chats(tmp_path / "p.jsonl", 3)
    cfg = make_cfg(tiny_target_dir, tmp_path / "p.jsonl", tmp_path / "tf")
    build.build(cfg, session, progress=False, source="teacher_forced")
    from koala.errors import KoalaError

    with pytest.raises(KoalaError, match="other settings"):
        build.plan(cfg, session.target, tmp_path / "tf", source="generated")


def test_a_shard_from_before_the_source_column_loads_as_generated(tmp_path):
    old = pa.table({"sample_id": ["a"], "prompt_id": ["p"], "source": ["sharegpt"], "category": ["c"]})
    t = shards._current(old)
    assert t.column_names == ["sample_id", "prompt_id", "source", "prompt_source", "category"]
    assert t["source"].to_pylist() == ["generated"] and t["prompt_source"].to_pylist() == ["sharegpt"]


def test_bf16_teacher_forcing_stays_close_to_float32(default_target):
    """The real target teacher-forced under bf16 autocast: the same top-1 at nearly every answer position, top-k
    log-probs and features close to float32's (bench/sampling.py measures this on held-out ShareGPT)."""
    from koala.precision import ComputeDtype

    tok = default_target.tokenizer
    chats = [({"prompt": "What is the capital of France?", "response": "The capital of France is Paris."}),
             ({"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof,\nthe garden drinks it slowly,"
                                                                   "\nspring wakes in the mud."})]
    from koala.data.prompts import PromptRecord

    seqs = [teacher.tokenize(tok, PromptRecord(str(i), "t", None, ({"role": "user", "content": c["prompt"]},), (),
                                               c["response"]), 256) for i, c in enumerate(chats)]
    f32 = teacher.force_batch(default_target.model, seqs, 8, True, compute=ComputeDtype("float32", "test"))
    b16 = teacher.force_batch(default_target.model, seqs, 8, True, compute=ComputeDtype("bfloat16", "test"))
    top1 = [(a.topk_ids[:, 0] == b.topk_ids[:, 0]).mean() for a, b in zip(f32, b16)]
    assert min(top1) >= 0.8, top1
    for a, b in zip(f32, b16):
        assert b.features.dtype == a.features.dtype == np.float16 and b.features.shape == a.features.shape
        assert np.abs(a.topk_logprobs[:, 0].astype(np.float32) - b.topk_logprobs[:, 0]).mean() < 0.2
