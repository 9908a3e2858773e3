"""The pipeline flow under prefect_test_harness, with a real MLflow store, and the promotion rule end to end."""

import json
import threading
from pathlib import Path

import pytest
import yaml

from koala.config import load_config
from koala.promotion import decide
from koala.report import EvalReport
from tests.koala.data.test_shards import tiny_target_dir, write_prompts  # noqa: F401 - fixture reuse


def tiny_config(tmp: Path, target_dir: Path, **extra) -> Path:
    write_prompts(tmp / "p.jsonl", 6)
    (tmp / "bench.jsonl").write_text("\n".join(json.dumps({"prompt": f"Say hello {i}.", "category": c})
                                               for i, c in enumerate(["chat", "math"])) + "\n")
    cfg = {
        "run_dir": str(tmp / "run"),
        "target": {"spec": str(target_dir)},
        "prompts": {"source": str(tmp / "p.jsonl"), "max_prompt_tokens": 200},
        "sampling": {"out_dir": str(tmp / "run" / "data"), "shard_size": 4, "max_new_tokens": 8, "batch_size": 4,
                     "topk_logprobs": 8, "temperature": 0.0},
        "drafter": {"layers": 1},
        "training": {"steps": 3, "batch_size": 2, "max_seq_len": 64, "checkpoint_every": 3, "eval_every": 3,
                     "warmup_steps": 1},
        "eval": {"bench": str(tmp / "bench.jsonl"), "limit": 2, "max_new_tokens": 8, "gamma": 2, "warmup": 0,
                 "compile": False},  # orchestration under test here; the compiled engine has tests of its own
        "tracking": {"experiment": "koala-test"},
    }
    for k, v in extra.items():
        section, field = k.split("__")
        cfg.setdefault(section, {})[field] = v
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _variant(drafter: str, dst: Path, delta: float) -> str:
    """A copy of a drafter with other weights (another registered version: each delta its own)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(drafter, dst)
    w = load_file(dst / "model.safetensors")
    save_file({k: v + delta if v.is_floating_point() else v for k, v in w.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return str(dst)


def _report(speedups, identical=None, **lossless):
    """An evaluation report with fixed per-prompt timings: prompt i at 30 + i tokens/s alone, speedups[i] x that."""
    rows = [{"id": f"p{i}", "tokens_per_s": (30.0 + i) * s, "ar_tokens_per_s": 30.0 + i}
            for i, s in enumerate(speedups)]
    n = len(rows)
    return EvalReport.model_validate({
        "drafter": "d", "tau": 2.0, "per_prompt": rows,
        "lossless": {"identical": n if identical is None else identical, "total": n, "checked": True, **lossless},
        "speedup": sum(r["tokens_per_s"] for r in rows) / sum(r["ar_tokens_per_s"] for r in rows)})


CLEAR = [1.31, 1.26, 1.35, 1.28, 1.33, 1.30, 1.27, 1.34]  # every prompt clearly faster
NOISY = [0.90, 1.21, 0.94, 1.16, 1.01, 1.12, 0.92, 1.09]  # 1.04x on average, within the prompts' spread


def test_decide_rule():
    assert decide(_report(CLEAR), None).promote
    assert not decide(_report([0.9] * 8), None).promote
    assert not decide(_report(CLEAR, identical=7), None).promote
    tie = _report(CLEAR, identical=7, near_ties=[{"index": 3, "margin": 4e-4, "near_tie": True}])
    assert decide(tie, None).promote  # a compiled engine's rounding flip at a near-tie is reported, not a failure
    bug = _report(CLEAR, identical=7, near_ties=[], differences=[{"index": 3, "margin": 2.0}])
    assert not decide(bug, None).promote


def test_a_first_champion_needs_its_interval_above_the_target_alone():
    d = decide(_report(NOISY), None)
    assert not d.promote and "not clearly faster than the target alone" in d.reason and "95% CI 0.9" in d.reason
    d = decide(_report(CLEAR), None)
    assert d.promote and "first champion: speed-up 1.30" in d.reason and "95% CI 1.2" in d.reason
    assert not decide(_report([1.5]), None).promote  # one prompt: no interval, no promotion


def test_a_challenger_needs_its_interval_against_the_champion_above_one():
    champion = _report(CLEAR)
    same = _report([s * f for s, f in zip(CLEAR, [1.03, 0.98, 1.02, 0.99, 1.04, 0.97, 1.01, 1.0])])
    d = decide(same, champion, "3")
    assert not d.promote and "does not clearly beat champion v3's 1.30" in d.reason and "95% CI" in d.reason
    better = _report([s * 1.2 for s in CLEAR])
    d = decide(better, champion, "3")
    assert d.promote and "beats champion v3's 1.30" in d.reason and "1.200 times it" in d.reason
    unpaired = _report([1.0, 1.0]).model_copy(update={"per_prompt": []})
    assert not decide(_report([1.9, 1.9]), unpaired, "3").promote  # no shared prompts


@pytest.mark.slow
def test_pipeline_registers_and_applies_the_rule(tmp_path, tiny_target_dir):  # noqa: F811
    from mlflow import MlflowClient

    from koala_flows.pipeline import koala_pipeline
    from koala.tracking import resolve_uri
    from koala_tasks.evaluation import promote_drafter

    cfg_path = tiny_config(tmp_path, tiny_target_dir)
    s = koala_pipeline(config_path=str(cfg_path))
    cfg = load_config(path=cfg_path)
    uri = resolve_uri(None, cfg.run_dir)
    client = MlflowClient(uri)
    v = client.get_model_version(s.model, s.version)
    assert v.tags["promoted"] == str(s.promoted).lower() and v.tags["promotion_reason"] == s.reason
    assert s.lossless == "2/2"
    assert s.promoted == (s.speedup_ci95[0] > 1.0)  # the interval's lower bound decides, not the mean
    runs = client.search_runs([client.get_experiment_by_name("koala-test").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"distill-tvdpp", "evaluate", "register"} <= names
    assert any(r.data.tags.get("mlflow.parentRunId") == s.mlflow_run_id for r in runs)

    # Make v1 the champion by hand, then a worse candidate is registered but not promoted, with the reason tagged.
    from koala_tasks.evaluation import register_drafter

    client.set_registered_model_alias(s.model, "champion", s.version)
    from koala.evaluate import load_bench

    ids = [r.id for r in load_bench(cfg.eval.bench, cfg.eval.limit)]  # the prompts the champion is re-measured on

    def timed(speedup):  # a report with per-prompt timings on those prompts
        return EvalReport.model_validate({
            "drafter": "d", "tau": 1.0, "speedup": speedup, "device": "cpu", "dtype": "float32",
            "lossless": {"identical": 2, "total": 2, "checked": True},
            "per_prompt": [{"id": i, "tokens_per_s": 30.0 * speedup, "ar_tokens_per_s": 30.0} for i in ids]})

    worse = timed(0.01)
    drafter_dir = s.drafter
    assert register_drafter(cfg, drafter_dir, worse)["version"] == s.version  # same weights: same version
    r2 = register_drafter(cfg, _variant(drafter_dir, tmp_path / "v2", 1e-3), worse)
    assert r2["version"] != s.version
    d = promote_drafter(cfg, r2, worse, str(tmp_path / "eval2"))
    assert not d.promoted and "does not clearly beat champion v" in d.reason
    v2 = client.get_model_version(s.model, r2["version"])
    assert v2.tags["promoted"] == "false" and "re-measured" in v2.tags["promotion_reason"]
    assert str(client.get_model_version_by_alias(s.model, "champion").version) == s.version

    # Two promotions at once: one champion, the better one, and a decision recorded for both.
    a = register_drafter(cfg, _variant(drafter_dir, tmp_path / "va", 2e-3), worse)
    b = register_drafter(cfg, _variant(drafter_dir, tmp_path / "vb", 3e-3), worse)
    assert len({r2["version"], a["version"], b["version"]}) == 3  # other weights: other versions
    better = timed(50.0)
    results = {}
    threads = [threading.Thread(target=lambda k, r, rep: results.__setitem__(k, promote_drafter(
        cfg, r, rep, str(tmp_path / f"eval-{k}"))), args=(k, r, rep)) for k, r, rep in
        (("a", a, worse), ("b", b, better))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results["b"].promoted and not results["a"].promoted
    assert str(client.get_model_version_by_alias(s.model, "champion").version) == b["version"]
    for r in (a, b):
        assert "promotion_reason" in client.get_model_version(s.model, r["version"]).tags

    # The registry failing while the champion is read, or while the alias moves: no promotion, the champion
    # untouched, the reason tagged on the candidate.
    from mlflow import MlflowClient as Client
    from mlflow.exceptions import MlflowException

    best = register_drafter(cfg, _variant(drafter_dir, tmp_path / "vc", 4e-3), worse)
    for method in ("get_model_version_by_alias", "set_registered_model_alias"):
        def broken(*a, **k):
            raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

        original = getattr(Client, method)
        setattr(Client, method, broken)
        try:
            d = promote_drafter(cfg, best, timed(500.0), str(tmp_path / f"eval-{method}"))
        finally:
            setattr(Client, method, original)
        assert not d.promoted and "registry error" in d.reason, d
        assert str(client.get_model_version_by_alias(s.model, "champion").version) == b["version"]
        assert "registry error" in client.get_model_version(s.model, best["version"]).tags["promotion_reason"]

    # A cached stage whose output has since been deleted runs again instead of handing on a path that is gone.
    import shutil

    shutil.rmtree(s.drafter)
    s3 = koala_pipeline(config_path=str(cfg_path))
    assert s3.drafter == s.drafter and (Path(s3.drafter) / "koala.json").exists()


def test_a_run_budget_gives_the_training_what_the_data_stages_left():
    """training.run_minutes: the training gets the run's minutes less those spent and those kept for the evaluation,
    never more than training.max_minutes, never less than MIN_TRAINING_MINUTES; without it, max_minutes."""
    from koala.config import TrainingConfig
    from koala_flows.pipeline import MIN_TRAINING_MINUTES, training_minutes

    said = []
    tc = TrainingConfig(max_minutes=55, run_minutes=90, eval_minutes=20)
    assert training_minutes(tc, 10.0, said.append) == 55 and not said  # 60 left: the training's own cap holds
    assert training_minutes(tc, 31.0, said.append) == 39 and "39.0 min of its 55" in said[-1]
    assert training_minutes(tc, 80.0, said.append) == MIN_TRAINING_MINUTES
    assert training_minutes(TrainingConfig(run_minutes=12, eval_minutes=4), 5.0, said.append) == 3
    assert training_minutes(TrainingConfig(max_minutes=3), 500.0, said.append) == 3
    # eval_minutes unset: the minutes estimated for the evaluation are kept instead; set, they are
    assert training_minutes(TrainingConfig(run_minutes=12), 5.0, said.append, estimated=2.5) == 4.5
    assert "2.5 kept for the evaluation" in said[-1]
    assert training_minutes(TrainingConfig(run_minutes=12, eval_minutes=4), 5.0, said.append, estimated=2.5) == 3


def test_an_evaluation_is_estimated_by_the_generations_it_runs():
    """evaluation_work: each answer with and without the drafter (once where the baseline is shared), the warm-up
    pair and the plain run after it, the chain probes, and for a shape chosen by measurement the tree's."""
    from koala.config import EvalConfig
    from koala.evaluate import PROBE_PROMPTS, PROBE_TOKENS, evaluation_work

    fixed, probes = EvalConfig(gamma=2, max_new_tokens=100), PROBE_PROMPTS * min(PROBE_TOKENS, 100)
    assert evaluation_work(fixed, 10) == (20 + 3 + PROBE_PROMPTS, (20 + 3) * 100 + probes)
    assert evaluation_work(fixed, 10, autoregressive=False) == (10 + 3 + PROBE_PROMPTS, (10 + 3) * 100 + probes)
    eager = EvalConfig(gamma=2, max_new_tokens=100, warmup=0)  # nothing to compile: no warm-up pair
    assert evaluation_work(eager, 2, compiled=False)[1] == (4 + 1) * 100 + 2 * min(PROBE_TOKENS, 100)
    auto = EvalConfig(gamma="auto", max_new_tokens=100)
    assert evaluation_work(auto, 10) == (20 + 3 + 2 + 2 * PROBE_PROMPTS, (20 + 3 + 2) * 100 + 2 * probes)


def test_a_baseline_is_shared_by_evaluations_of_the_same_prompts_and_settings():
    """The run's estimate counts an evaluation's autoregressive runs once per prompt set and settings, as
    koala.evaluate._autoregressive caches them: without lookup shares the first's; another benchmark, limit or
    length does not."""
    from koala.config import EvalConfig
    from koala.evaluate import shares_baseline

    first = EvalConfig(bench="mtbench", limit=8, lookup=True)
    assert shares_baseline(first.model_copy(update={"lookup": False, "gamma": 3}), first)
    for other in ({"bench": "humaneval"}, {"limit": 4}, {"max_new_tokens": 64}, {"temperature": 1.0}):
        assert not shares_baseline(first.model_copy(update=other), first)


@pytest.mark.slow
def test_two_stage_recipe_teacher_forced_then_sampled(tmp_path, tiny_target_dir):  # noqa: F811
    """The default profile's recipe, tiny: teacher-forced shards with features, an EAGLE head trained as it drafts,
    fine-tuned on the sampled answers; a second evaluation without prompt lookup and one on another benchmark. The
    run's budget is spent before the training (the evaluation's minutes estimated from the target's tokens/s,
    measured as it will decode, and a set-up allowance per benchmark): its stages share MIN_TRAINING_MINUTES in
    proportion to their steps, each training's budget (its MLflow run's training.max_minutes)."""
    from mlflow import MlflowClient

    from koala.tracking import resolve_uri
    from koala_flows.pipeline import MIN_TRAINING_MINUTES, koala_pipeline
    from koala.data import shards
    from tests.koala.data.test_teacher import write_chats

    write_chats(tmp_path / "chats.jsonl", 6)
    cfg_path = tiny_config(
        tmp_path, tiny_target_dir,
        prompts__source=str(tmp_path / "chats.jsonl"),
        teacher_forced__limit=6, teacher_forced__out_dir=str(tmp_path / "run" / "teacher"),
        teacher_forced__shard_size=3, teacher_forced__features=True, teacher_forced__topk_logprobs=4,
        drafter__kind="eagle", training__finetune_steps=2, training__unroll=2, training__feature_noise=0.1,
        eval__alone=True, eval__lookup=True, eval__also=[str(tmp_path / "bench.jsonl") + ":1"],
        training__run_minutes=1)
    s = koala_pipeline(config_path=str(cfg_path))
    assert [st.steps for st in s.stages] == [3, 2]
    client = MlflowClient(resolve_uri(None, str(tmp_path / "run")))
    runs = client.search_runs([client.get_experiment_by_name("koala-test").experiment_id])
    parent = client.get_run(s.mlflow_run_id).data.metrics
    assert parent["eval_minutes_estimated"] > 3 * 1.0  # three benchmarks' set-up, and their decoding
    assert parent["eval_minutes"] > 0
    budgets = sorted(float(r.data.params["training.max_minutes"]) for r in runs if r.info.run_name.startswith("heads"))
    assert budgets == pytest.approx([MIN_TRAINING_MINUTES * 2 / 5, MIN_TRAINING_MINUTES * 3 / 5])
    assert s.stages[0].data.endswith("teacher") and s.stages[1].data.endswith("data")
    # trained two drafts deep, measured three deep (koala.training.heads_objectives.MEASURED_DRAFTS)
    assert "heldout_greedy_agreement_pos2" in s.stages[0].heldout and len(s.stages[0].agreement_by_draft()) == 3
    assert s.drafter.startswith("heads:") and s.lossless == "2/2"
    assert set(s.more) == {"alone", "bench-1"}
    assert s.more["alone"].lookup is False and s.more["alone"].lossless == "2/2"
    rows = shards.load(tmp_path / "run" / "teacher", columns=["source"]).to_pylist()
    assert len(rows) == 6 and {r["source"] for r in rows} == {"teacher_forced"}
    import json

    info = json.loads((Path(s.drafter.removeprefix("heads:")) / "heads.json").read_text())
    assert info["init_from"] and info["data_source"] == "generated"


def test_unknown_loss_or_kind_in_a_profile_fails_early(tmp_path):
    from koala.errors import KoalaError

    p = tmp_path / "bad.yaml"
    p.write_text("drafter:\n  kind: transformer-xl\n")
    with pytest.raises(KoalaError, match="field drafter.kind"):
        load_config(path=p)
    p.write_text("training:\n  loss: mse\n")
    with pytest.raises(KoalaError, match="field training.loss"):
        load_config(path=p)


def test_unreachable_tracking_server_fails_before_any_stage(tmp_path):
    from koala.errors import KoalaError
    from koala.tracking import check_reachable

    with pytest.raises(KoalaError, match=r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable"):
        check_reachable("http://127.0.0.1:9", timeout=2)
