"""The typed evaluation report: report.json files of earlier versions load, and every rendering reads the model."""

import json

from koala.promotion import decide
from koala.render import markdown, summary_line, write_report
from koala.report import EvalReport, RunSummary, StageSummary

# A report.json as koala 0.2.0 wrote it before the report was typed: no interval, no tree, no histogram.
OLD = {
    "accept_counts": [91, 18], "acceptance_by_position": [0.514], "bench": "mtbench", "compile_s": 365.0,
    "device": "cpu (Intel(R) Xeon(R) Processor, 2 threads)", "drafter": "lookup+heads:eagle-K1",
    "drafter_cost_ratio": 0.05, "drafter_parameter_ratio": 0.03, "drafter_step_ms": 1.2, "dtype": "float32",
    "gamma": 1, "latency_model_speedup": 1.3, "max_new_tokens": 128, "mean_draft_length": 0.9,
    "memory_bound_speedup": 1.35, "mode": "compile", "prompts": 2, "setup_s": 12.0, "speedup": 1.129,
    "target": "smollm2-135m-instruct", "target_hash": "b179", "target_step_ms": 25.1, "tau": 1.375,
    "temperature": 0.0, "threshold": 0.5, "top_p": 1.0, "a_key_no_longer_written": 1,
    "gamma_choice": {"auto": True, "chosen": 1, "cost_by_width_ms": {"1": 25.1, "2": 27.0},
                     "expected_speedup": 1.21, "expected_tokens_per_s": {"0": 39.8, "1": 48.3}},
    "lossless": {"checked": True, "differences": [], "identical": 1, "total": 2,
                 "near_ties": [{"id": "b", "index": 7, "margin": 0.004, "tolerance": 0.01, "near_tie": True,
                                "ar_token": 3, "spec_token": 5}]},
    "per_category": {"writing": {"prompts": 1, "tau": 1.2, "speedup": 1.1, "tokens_per_s": 38.1},
                     "coding": {"prompts": 1, "tau": 1.5, "speedup": 1.2, "tokens_per_s": 48.0}},
    "per_prompt": [
        {"id": "a", "category": "writing", "prompt_tokens": 53, "new_tokens": 128, "wall_s": 3.36,
         "target_forwards": 110, "tau": 1.16, "tokens_per_s": 38.1, "ar_new_tokens": 128, "ar_wall_s": 3.2,
         "ar_tokens_per_s": 39.9, "identical": True, "first_difference": None, "accept_counts": [91, 18]},
        {"id": "b", "category": "coding", "prompt_tokens": 40, "new_tokens": 128, "wall_s": 2.67,
         "target_forwards": 85, "tau": 1.5, "tokens_per_s": 48.0, "ar_new_tokens": 128, "ar_wall_s": 3.3,
         "ar_tokens_per_s": 38.8, "identical": False, "accept_counts": [40, 45],
         "first_difference": {"index": 7, "margin": 0.004, "tolerance": 0.01, "near_tie": True}}],
    "tokens_per_s": {"autoregressive": 39.24, "hf_assisted": None, "hf_generate": None, "speculative": 44.29},
}


def test_a_report_json_of_an_earlier_version_loads(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(OLD))
    r = EvalReport.load(tmp_path / "report.json")
    assert r.tau == 1.375 and r.mode == "compile" and r.auto and r.draft_shape == "gamma 1"
    assert r.speedup_ci95 is None and r.tree is None and r.accepted_path_histogram == []  # absent then: defaults
    assert r.lossless.text == "1/2" and r.lossless.holds and r.lossless.near_ties[0].id == "b"
    assert r.per_prompt[1].first_difference.near_tie and r.per_category["coding"].speedup == 1.2
    assert not hasattr(r, "a_key_no_longer_written")
    assert decide(r, None).reason.startswith("speed-up 1.129x (95% CI")  # the rule reads it like a new one


def test_renderings_read_the_typed_report(tmp_path):
    r = EvalReport.model_validate(OLD)
    r.speedup_ci95 = (0.95, 1.3)
    md = markdown(r)
    assert "| τ (tokens per target forward) | 1.38 |" in md and "95% CI 0.95-1.30x" in md
    assert "| differs: b | at token 7, logit margin 0.004 (near-tie of rounding, within 0.01) |" in md
    assert "auto chose gamma 1: expected 1.21x, measured 1.13x" in md
    line = summary_line(r)
    assert line.startswith("lookup+heads:eagle-K1: tau 1.38, speed-up 1.13x") and "lossless 1/2 (+1 differing" in line
    write_report(r, tmp_path)
    for f in ("report.json", "report.md", "acceptance_by_position.png", "gamma_choice.png", "speedup_by_category.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert EvalReport.load(tmp_path / "report.json").speedup_ci95 == (0.95, 1.3)


def test_the_run_summary_carries_the_candidate_and_each_stage():
    r = EvalReport.model_validate(OLD)
    st = StageSummary(data="d", steps=3, drafter="heads:x",
                      heldout={"heldout_greedy_agreement_pos2": 0.3, "heldout_greedy_agreement_pos1": 0.4, "loss": 1})
    s = RunSummary.of(r, data="d", drafter="heads:x", stages=[st], model="m", version="1", promoted=False,
                      reason="why", mlflow_uri="sqlite:///x", mlflow_run_id="abc", experiment="e")
    assert s.lossless == "1/2 (+1 at near-ties of rounding)" and s.engine.startswith("compile, gamma 1 (auto), compile 365 s")
    assert s.stages[0].agreement_by_draft() == [0.4, 0.3]
    assert RunSummary.model_validate(s.model_dump(mode="json")) == s  # what the flow logs parses back
