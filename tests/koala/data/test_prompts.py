import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala.data import prompts as P
from koala.errors import KoalaError


def _conv(i):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                              {"from": "gpt", "value": f"answer {i}"},
                                              {"from": "human", "value": f"follow-up {i}"}]}


def test_sharegpt_recovers_complete_records_of_a_cut_off_file(tmp_path):
    full = json.dumps([_conv(i) for i in range(10)], indent=2)
    cut = full[: full.index('"c7"') + 30]  # ends inside record 7
    f = tmp_path / "sharegpt.json"
    f.write_text(cut)
    stats = P.ShareGPTStats()
    records = list(P.sharegpt(f, stats=stats))
    assert stats.recovered == 7 and stats.truncated
    assert [r.messages[0]["content"] for r in records] == [f"question {i}" for i in range(7)]
    two = list(P.sharegpt(f, turns=2))
    assert [m["role"] for m in two[0].messages] == ["user", "assistant", "user"]


def test_sharegpt_complete_file_is_not_truncated(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([_conv(i) for i in range(3)]))
    stats = P.ShareGPTStats()
    assert len(list(P.sharegpt(f, stats=stats))) == 3 and not stats.truncated


def test_mtbench_has_80_questions_and_second_turns():
    qs = list(P.mtbench())
    assert len(qs) == 80 and len({q.category for q in qs}) == 8
    assert all(len(q.followups) == 1 for q in P.mtbench(both_turns=True))


def test_humaneval():
    qs = list(P.humaneval())
    assert len(qs) == 164 and "def " in qs[0].messages[0]["content"]


def test_files_with_column_mapping(tmp_path):
    rows = [{"q": "hello", "kind": "greet"}, {"q": "bye", "kind": "greet"}, {"q": "hello", "kind": "greet"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("q,kind\nhello,greet\nbye,greet\n")
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        recs = P.load(str(tmp_path / name), prompt_col="q", category_col="kind")
        assert [r.messages[0]["content"] for r in recs] == ["hello", "bye"]  # de-duplicated by content hash
        assert recs[0].category == "greet"
        assert recs[0].id == P.prompt_id([{"role": "user", "content": "hello"}])


def test_missing_column_is_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(KoalaError, match="no column 'prompt'.*columns: text"):
        P.load(str(tmp_path / "p.jsonl"))


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(KoalaError, match="has no rows"):
        P.load(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(KoalaError, match="unreadable"):
        P.load(str(tmp_path / "bad.parquet"))
    with pytest.raises(KoalaError, match="does not exist"):
        P.load(str(tmp_path / "missing.jsonl"))
    with pytest.raises(KoalaError, match="unknown prompt source"):
        P.load("nonsense")


def test_length_filter_counts(default_target):
    recs = [P.make_record("t", "c", [{"role": "user", "content": "word " * n}]) for n in (1, 50, 400)]
    counts = {}
    kept = list(P.filter_by_length(recs, default_target.tokenizer, min_tokens=1, max_tokens=120, counts=counts))
    assert len(kept) == 2 and counts == {"too_long": 1}


def test_sharegpt_heldout_split_is_disjoint_from_training_and_stable(tmp_path):
    convs = [_conv(i) for i in range(400)]
    f = tmp_path / "s.json"
    f.write_text(json.dumps(convs))
    train = {r.messages[0]["content"] for r in P.sharegpt(f)}
    held = {r.messages[0]["content"] for r in P.sharegpt(f, split="heldout")}
    assert held and not train & held
    assert train | held == {r.messages[0]["content"] for r in P.sharegpt(f, split="all")}
    assert len(held) < len(convs) / 16  # about one in HELDOUT_EVERY
    # the split follows the conversation, not its position, its turns or the file's length
    f.write_text(json.dumps(convs[::-1][:200]))
    assert {r.messages[0]["content"] for r in P.sharegpt(f, turns=2, split="heldout")} == {
        t for t in held if int(t.split()[1]) >= 200}
    with pytest.raises(KoalaError, match="split"):
        list(P.sharegpt(f, split="test"))


def test_sharegpt_heldout_is_a_bench_and_a_source():
    from koala.config import EvalConfig
    from koala.evaluate import load_bench

    from koala.checks import check_prompt_source

    recs = load_bench("sharegpt-heldout", 5)
    assert len(recs) == 5 and all(P.is_heldout(r.messages[0]["content"]) and len(r.messages[-1]["content"]) <= 2000
                                  for r in recs)
    check_prompt_source("sharegpt-heldout")  # a named source, not a missing file
    first = next(P.iter_source("sharegpt-heldout"))
    assert P.is_heldout(first.messages[0]["content"])
    assert EvalConfig(also=["sharegpt-heldout:40"]).also == ["sharegpt-heldout:40"]
