import json

import pytest

from koala.config import EvalConfig
from koala.data import prompts as P
from koala.evaluate import acceptance_by_position, evaluate, interleave_categories
from koala.engine.drafter_spec import load_drafter
from koala.report import EvalReport
from koala.targets import encode_chat


def test_acceptance_by_position():
    # 10 full rounds of 2 drafts: 2 accepted 0, 3 accepted 1, 5 accepted both -> pos1: 8/10, pos2: 5/8
    rounds = [(2, 0)] * 2 + [(2, 1)] * 3 + [(2, 2)] * 5
    assert acceptance_by_position(rounds, 2) == [0.8, 0.625]
    # a round that drafted only one token does not count as reaching position 2
    assert acceptance_by_position(rounds + [(1, 1)], 2) == [9 / 11, 5 / 8]


def test_interleave_takes_each_category_first():
    recs = [P.make_record("m", c, [{"role": "user", "content": f"{c}{i}"}]) for c in "abc" for i in range(3)]
    assert [r.category for r in interleave_categories(recs, 4)] == ["a", "b", "c", "a"]


@pytest.mark.slow
def test_real_target_greedy_speculative_equals_autoregressive(default_session):
    s = default_session
    prompts = [(r.id, encode_chat(s.target.tokenizer, list(r.messages)))
               for r in interleave_categories(P.load("mtbench"), 3)]
    ar = {i: s.run(ids, 24).tokens for i, ids in prompts}
    for d in ("truncate:2", "ngram"):
        drafter = s.drafter(d)
        for i, ids in prompts:
            assert s.run(ids, 24, drafter=drafter, gamma=4).tokens == ar[i], (d, i)


@pytest.mark.slow
def test_eval_writes_report_and_plots(default_session, tmp_path):
    cfg = EvalConfig(limit=2, max_new_tokens=16, gamma=3, warmup=1)
    report = evaluate(default_session, "ngram", cfg, out_dir=tmp_path)
    for f in ("report.json", "report.md", "acceptance_by_position.png", "speedup_by_category.png"):
        assert (tmp_path / f).stat().st_size > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("target", "drafter", "device", "dtype", "gamma", "temperature", "tau", "speedup", "tokens_per_s",
                "lossless", "acceptance_by_position", "per_category"):
        assert key in saved
    assert saved["lossless"] == {"identical": 2, "total": 2, "checked": True, "near_ties": [], "differences": []}
    assert saved["gamma"] == 3 and saved["gamma_choice"] == {"auto": False, "chosen": 3} and saved["mode"] == "eager"
    assert len(saved["acceptance_by_position"]) == 3 and saved["tau"] >= 1.0
    assert set(saved["per_category"]) == {"writing", "roleplay"}
    lo, hi = saved["speedup_ci95"]  # the promotion rule's interval, over the two prompts
    assert lo <= saved["speedup"] <= hi and "95% CI" in (tmp_path / "report.md").read_text()
    again = EvalReport.load(tmp_path / "report.json")  # what the returned report says is what the file says
    assert again.model_dump() == EvalReport.model_validate(report.model_dump(mode="json")).model_dump()
    sampled = evaluate(default_session, "truncate:2", EvalConfig(limit=1, max_new_tokens=8, temperature=0.7, warmup=0))
    assert sampled.lossless.checked is False and sampled.tau >= 1.0


def test_drafters_evaluated_in_one_session_share_the_autoregressive_runs(default_session):
    cfg = EvalConfig(limit=2, max_new_tokens=8, gamma=2, warmup=0)
    default_session.autoregressive.clear()
    a = evaluate(default_session, "ngram", cfg)
    b = evaluate(default_session, "truncate:2", cfg)
    assert len(default_session.autoregressive) == 2  # one per prompt, measured once
    assert [r.ar_wall_s for r in a.per_prompt] == [r.ar_wall_s for r in b.per_prompt]
    other = evaluate(default_session, "ngram", cfg.model_copy(update={"max_new_tokens": 6}))
    assert len(default_session.autoregressive) == 4 and all(r.ar_new_tokens == 6 for r in other.per_prompt)


def test_drafter_spec_errors(default_session):
    from koala.errors import KoalaError
    with pytest.raises(KoalaError, match="truncate:N"):
        load_drafter("truncate:x", default_session.engine)
    with pytest.raises(KoalaError, match="1 <= N <= 30"):
        load_drafter("truncate:99", default_session.engine)


def test_first_difference_reports_the_target_margin(default_session):
    import torch

    from koala.evaluate import first_difference, kernel_margins

    s = default_session
    ids = encode_chat(s.target.tokenizer, [{"role": "user", "content": "Count to five."}])
    ar = s.run(ids, 6).tokens
    assert first_difference(s, ids, ar, list(ar)) is None
    other = ar[:3] + [(ar[3] + 1) % s.engine.args.vocab_size] + ar[4:]
    d = first_difference(s, ids, ar, other)
    assert d.index == 3 and d.ar_token == ar[3] and d.margin > 1e-2 and not d.near_tie
    assert d.kernel_margins == []  # eager float32 must be bit-exact: no kernel may excuse a difference
    ids_ = torch.tensor([ids + ar[:3]])
    margins = kernel_margins(s, ids_, ar[3], other[3])  # the same margin through steps of 1, 2, 4, 8 tokens
    assert len(margins) == 4 and all(abs(m - d.margin) < 1e-3 for m in margins)


def test_near_tie_tolerance_by_dtype_and_mode():
    from koala.evaluate import NEAR_TIE, near_tie_tolerance

    assert near_tie_tolerance("float32", 20.0, compiled=False) == 0.0  # eager float32: bit-exact, no excuse
    assert near_tie_tolerance("float32", 20.0, compiled=True) == NEAR_TIE
    assert near_tie_tolerance("bfloat16", 20.0, compiled=False) == 0.5  # 4 units of 2**-7 x 16 (logits 16..32)
    assert near_tie_tolerance("bfloat16", 40.0, compiled=False) == 2 * near_tie_tolerance("bfloat16", 20.0, False)


@pytest.mark.slow
def test_eval_gamma_auto_records_the_choice(default_session, tmp_path, monkeypatch):
    import koala.engine.calibrate as calibrate

    monkeypatch.setattr(calibrate, "TREE_PROBE", (2, 2))  # a 2 x 2 probe tree: the eager target's curve to 5 tokens
    report = evaluate(default_session, "ngram", EvalConfig(limit=1, max_new_tokens=24, gamma="auto", warmup=0),
                      out_dir=tmp_path)
    ch = report.gamma_choice
    # greedy: chains and trees up to the probe's 2 x 2, ranked on the measured curve to its 5 tokens
    assert ch["auto"] and ch["shape"] in ch["shapes"] and set(ch["cost_by_width_ms"]) == set(range(1, 6))
    assert {"1x2", "2x2"} <= set(ch["shapes"])  # trees among them (DEPTHxTOPK)
    assert ch["shapes"][ch["shape"]]["rate"] == max(v["rate"] for k, v in ch["shapes"].items() if k != "0x0")
    assert report.gamma == ch["depth"] and (report.tree is None) == (ch["topk"] == 1)
    assert "measured_speedup" in ch and (tmp_path / "gamma_choice.png").stat().st_size > 0
    assert sum(report.accepted_path_histogram) > 0 and (tmp_path / "accepted_path.png").stat().st_size > 0
    assert report.lossless.identical == 1
