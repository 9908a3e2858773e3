"""The fault campaign, small (bench/faults.py runs it at full size): real CLI runs on the real default target,
killed, interrupted and starved of disk, then run again."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from bench.faults import (Campaign, disk_full_checkpoint, foreign_resume, sample_kill, sample_signal, train_kill)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    c = Campaign(tmp_path_factory.mktemp("faults"), n_prompts=4, max_new_tokens=8, train_steps=5, checkpoint_every=2)
    ref_dir, ref, _ = c.reference()
    return c, ref_dir, ref


@pytest.mark.slow
def test_sample_killed_while_updating_the_manifest_then_rerun_gives_exactly_the_reference(campaign):
    c, _, ref = campaign
    r = sample_kill(c, 0, "manifest.update:2", ref)
    assert r["killed"] and r["orphans"] == 0, r
    assert r["rerun_rc"] == 0 and r["corrupt"] == r["lost"] == r["extra"] == r["different"] == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("sig,rerun", [(signal.SIGINT, False), (signal.SIGTERM, False)])  # the kill test reruns
def test_sample_interrupted_stops_within_seconds_and_leaves_no_server(campaign, sig, rerun):
    c, _, ref = campaign
    r = sample_signal(c, 1, sig, 0.5, ref, rerun=rerun)
    assert r["rc"] == 128 + sig and r["stop_s"] is not None, r  # how fast: bench/faults.py reports stop_s
    assert r["orphans"] == 0 and not r["traceback"] and r["corrupt"] == 0, r
    if rerun:
        assert r["rerun_rc"] == 0 and r["lost"] == r["different"] == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["heads-medusa-adversarial"])  # distillation: the full-disk test resumes it
def test_training_killed_and_resumed_is_bitwise_an_uninterrupted_run(campaign, kind):
    c, data, _ = campaign
    r = train_kill(c, kind, 0, 3, data)
    assert r["killed"] and r["resume_rc"] == 0, r
    assert r["bitwise"] and all(r["bitwise"].values()), r
    if kind.endswith("adversarial"):
        assert "adversary" in r["bitwise"], r  # the discriminator is checkpointed and compared


@pytest.mark.slow
def test_resume_into_another_trainings_checkpoints_is_refused(campaign):
    c, data, _ = campaign
    r = foreign_resume(c, 0, data)
    assert r["ok"], r


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_resumable(campaign):
    c, data, _ = campaign
    r = disk_full_checkpoint(c, data)
    assert r["ok"], r


@pytest.mark.slow
def test_distill_runs_on_a_host_without_mlflow_or_prefect(campaign):
    """A torch-only GPU worker: `python -m koala.cli distill`, MLflow and Prefect absent, trains with tracking off
    and says so once."""
    c, data, _ = campaign
    out = c.out / "torch-only"
    absent = "import sys; sys.modules.update(mlflow=None, prefect=None, datasets=None); "
    code = absent + "from koala.cli import main; main()"
    argv = ["distill", "--config", str(c.config), "--data", str(data), "--out", str(out), "--steps", "2"]
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=c.out, env=c.env(None), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("MLflow is not installed: tracking off") == 1, r.stderr[-3000:]
    assert (out / "drafter" / "model.safetensors").exists()
