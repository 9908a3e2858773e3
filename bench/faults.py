"""The fault campaign: koala killed, interrupted and starved of disk, then run again; prints one JSON table.

    python bench/faults.py [--kills 20] [--signals 3] [--train-kills 2] [--out runs/faults] [--skip-pipeline]

Every trial runs the real CLI (`python -m koala_flows.cli ...`) on the real default target, in a subprocess, and
checks what a user would:

* `koala sample` SIGKILLed at seeded moments (while writing a shard, renaming it, updating the manifest, or at a
  random time) and run again: exactly the planned sample ids, none twice, every checksum valid, every row equal to an
  uninterrupted run's, no Prefect server left behind;
* SIGINT (to the process group, as Ctrl-C) and SIGTERM at random moments: exit 130/143 within 10 s, no orphan, and a
  rerun completes the same data;
* `koala distill`, `koala heads` (EAGLE) and adversarial `koala heads` (Medusa, discriminator) SIGKILLed at random
  steps and resumed with --resume: weights, optimizer and discriminator bitwise equal to an uninterrupted run;
* --resume into another training's checkpoints (other config, loss, steps, layers): refused in one line, nothing
  changed;
* the pipeline (`koala run`) killed in each stage and run again: finished stages reused, one model version; MLflow
  failing while registering and while promoting: no champion change;
* a full disk (an injected ENOSPC) while writing a shard and a checkpoint: a one-line error, nothing corrupt, and a
  rerun completes;
* every bad input in tests/bad_inputs.py: one line, non-zero, nothing written.

Kills are placed with KOALA_FAULT=POINT:N[:ACTION] (koala.interrupt.fault). Trials are appended to OUT/trials.jsonl
as they finish; a rerun skips the ones already there (delete the file to start over). The summary lands in
OUT/faults.json and on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_POINTS = ("shard.write", "shard.rename", "manifest.update")


@dataclass
class Result:
    rc: int
    wall_s: float
    output: str
    pid: int
    stop_s: float | None = None  # seconds from the signal to the exit


class Campaign:
    """Where a campaign runs (one directory), and how it calls koala."""

    def __init__(self, out: Path, config: Path | None = None, n_prompts: int = 8, max_new_tokens: int = 16,
                 train_steps: int = 6, checkpoint_every: int = 2):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.n_prompts, self.max_new_tokens = n_prompts, max_new_tokens
        self.train_steps, self.checkpoint_every = train_steps, checkpoint_every
        self.config = config or self._write_config()

    def _write_config(self) -> Path:
        """The smoke profile, small: a campaign is many runs."""
        import yaml

        from koala.config import CONFIG_DIR

        cfg = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
        cfg["run_dir"] = str(self.out / "run")
        cfg["sampling"].update(out_dir=str(self.out / "run" / "data"), shard_size=2, batch_size=2,
                               max_new_tokens=self.max_new_tokens)
        cfg["prompts"]["limit"] = self.n_prompts
        cfg["teacher_forced"] = {"limit": 0}
        cfg["drafter"] = {"kind": "draft_model", "layers": 1, "draft_vocab": 1024}
        cfg["training"].update(out_dir=str(self.out / "run" / "drafter"), steps=self.train_steps, finetune_steps=0,
                               batch_size=2, max_seq_len=96, checkpoint_every=self.checkpoint_every,
                               eval_every=self.train_steps, warmup_steps=1, unroll=1, feature_noise=0.0,
                               max_minutes=None)
        cfg["eval"].update(limit=2, max_new_tokens=16, compile=False, gamma=2, threshold=None, warmup=0)
        cfg["tracking"] = {"experiment": "koala-faults"}
        path = self.out / "campaign.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def env(self, fault: str | None = None) -> dict:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED":
               "false", "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("PREFECT_API_URL", None)  # koala starts (and must clean up) its own temporary server
        env.pop("KOALA_FAULT", None)
        if fault:
            env["KOALA_FAULT"] = fault
        return env

    def koala(self, *argv: str, fault: str | None = None, signal_at: tuple[int, float] | None = None,
              signal_when: Path | None = None, timeout: float = 900) -> Result:
        """Run `koala ARGV` in its own process group; optionally send a signal `signal_at=(sig, seconds)` after
        start (or once `signal_when` exists, then after the delay)."""
        t0 = time.monotonic()
        log = self.out / "last.log"
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "koala_flows.cli", *argv], cwd=self.out, env=self.env(fault),
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            stop_s = None
            if signal_at:
                sig, delay = signal_at
                while signal_when is not None and not signal_when.exists() and p.poll() is None:
                    time.sleep(0.05)
                t_sig = time.monotonic() + delay
                while time.monotonic() < t_sig and p.poll() is None:
                    time.sleep(0.05)
                if p.poll() is None:
                    ts = time.monotonic()
                    os.killpg(p.pid, sig)
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                    stop_s = time.monotonic() - ts
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        return Result(p.returncode, time.monotonic() - t0, log.read_text(errors="replace"), p.pid, stop_s)

    # --- koala sample ---------------------------------------------------------------------------------------------

    def sample(self, data: Path, **kw) -> Result:
        return self.koala("sample", "--config", str(self.config), "--out", str(data), **kw)

    def reference(self) -> tuple[Path, dict, float]:
        """An uninterrupted dataset: {sample_id: response_text}, and how long the run took."""
        ref = self.out / "reference-data"
        if not (ref / "manifest.json").exists():
            r = self.sample(ref)
            if r.rc != 0:
                raise SystemExit(f"the reference run failed:\n{r.output[-3000:]}")
            (self.out / "reference.json").write_text(json.dumps({"wall_s": r.wall_s}))
        return ref, rows(ref), json.loads((self.out / "reference.json").read_text())["wall_s"]


def rows(data: Path) -> dict:
    """{sample_id: response_text} after shards.load's checks (checksums, plan, rows, unique ids); raises if any
    fails."""
    from koala.data import shards

    t = shards.load(data, columns=["sample_id", "response_text"])
    ids = t.column("sample_id").to_pylist()
    if len(ids) != len(set(ids)):
        raise AssertionError(f"{len(ids) - len(set(ids))} duplicate sample ids")
    return dict(zip(ids, t.column("response_text").to_pylist()))


def servers_of(pid: int) -> list[int]:
    """Temporary Prefect servers (koala_flows.server) started by process `pid` that are still alive."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"koala_flows.server" in argv and len(argv) > argv.index(b"koala_flows.server") + 1 and \
                argv[argv.index(b"koala_flows.server") + 1] == str(pid).encode():
            found.append(int(d.name))
    return found


def orphans_after(pid: int, wait_s: float = 10.0) -> int:
    t = time.monotonic() + wait_s
    while servers_of(pid) and time.monotonic() < t:
        time.sleep(0.2)
    left = servers_of(pid)
    for p in left:  # clean up after a failed trial: the count is what matters
        os.kill(p, signal.SIGKILL)
    return len(left)


def compare_data(data: Path, ref: dict) -> dict:
    """Lost, extra, duplicate and differing rows against the reference; corrupt when shards.load refuses."""
    try:
        got = rows(data)
    except Exception as e:  # noqa: BLE001 - any refusal counts as corrupt, with the reason kept
        return {"corrupt": 1, "why": str(e)[:300], "lost": len(ref), "duplicates": 0, "different": 0}
    return {"corrupt": 0, "lost": len(set(ref) - set(got)), "extra": len(set(got) - set(ref)), "duplicates": 0,
            "different": sum(got[k] != v for k, v in ref.items() if k in got)}


def kill_moment(c: Campaign, rng: random.Random, ref_wall: float) -> str:
    """A seeded moment: a fault point and which arrival (3 in 4), or a time into the run."""
    if rng.random() < 0.75:
        return f"{rng.choice(SAMPLE_POINTS)}:{rng.randint(1, -(-c.n_prompts // 2))}"
    return f"time:{rng.uniform(0.3, 0.95) * ref_wall:.1f}s"


def sample_kill(c: Campaign, i: int, point: str, ref: dict) -> dict:
    data = c.out / f"kill-{i:02d}"
    shutil.rmtree(data, ignore_errors=True)
    if point.startswith("time:"):
        r = c.sample(data, signal_at=(signal.SIGKILL, float(point[5:-1])))
    else:
        r = c.sample(data, fault=point)
    killed = r.rc == -signal.SIGKILL
    orphans = orphans_after(r.pid)
    again = c.sample(data)
    out = {"trial": f"sample-kill-{i:02d}", "moment": point, "killed": killed, "orphans": orphans,
           "rerun_rc": again.rc, **compare_data(data, ref)}
    out["ok"] = again.rc == 0 and not out["orphans"] and not out["corrupt"] and not out["lost"] and \
        not out.get("extra") and not out["different"]
    shutil.rmtree(data, ignore_errors=True)
    return out


def sample_signal(c: Campaign, i: int, sig: int, delay: float, ref: dict, rerun: bool = True) -> dict:
    """`sig` to koala's process group `delay` s after the plan is written (trial 0: 2 s after start, in start-up)."""
    data = c.out / f"signal-{i:02d}"
    shutil.rmtree(data, ignore_errors=True)
    r = c.sample(data, signal_at=(sig, delay if i else 2.0), signal_when=None if i == 0 else data / "manifest.json")
    orphans = orphans_after(r.pid)
    again = c.sample(data) if rerun else r
    name = signal.Signals(sig).name
    out = {"trial": f"{name.lower()}-{i:02d}", "signal": name, "after_s": round(delay, 1), "rc": r.rc,
           "stop_s": None if r.stop_s is None else round(r.stop_s, 2), "orphans": orphans, "rerun_rc": again.rc,
           "traceback": "Traceback" in r.output, **(compare_data(data, ref) if rerun else partial_ok(data))}
    finished_first = r.stop_s is None and r.rc == 0  # the run ended before the signal: nothing to interrupt
    out["ok"] = (finished_first or (r.rc == 128 + sig and r.stop_s <= 10)) and not orphans and again.rc == 0 and \
        not out["corrupt"] and not out["lost"] and not out["different"] and not out["traceback"]
    shutil.rmtree(data, ignore_errors=True)
    return out


def partial_ok(data: Path) -> dict:
    """An interrupted dataset, not run again: what is recorded as done is whole (checksums), none twice."""
    from koala.data import shards

    m = shards.read_manifest(data) or shards.DatasetManifest()
    bad = [f for f, e in m.done.items() if not shards.shard_valid(data, e)]
    return {"corrupt": len(bad), "lost": 0, "duplicates": 0, "different": 0}


def disk_full_shard(c: Campaign, ref: dict) -> dict:
    data = c.out / "enospc-shard"
    shutil.rmtree(data, ignore_errors=True)
    r = c.sample(data, fault="shard.write:2:enospc")
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    tmp_left = list(data.glob(".shard-*.tmp"))
    again = c.sample(data)
    out = {"trial": "disk-full-shard", "rc": r.rc, "error": err[-1] if err else None, "temp_files_left": len(tmp_left),
           "rerun_rc": again.rc, **compare_data(data, ref)}
    out["ok"] = r.rc == 1 and bool(err) and "free disk space" in err[-1] and not tmp_left and again.rc == 0 and \
        not out["corrupt"] and not out["lost"] and not out["different"]
    shutil.rmtree(data, ignore_errors=True)
    return out


# --- training --------------------------------------------------------------------------------------------------

TRAININGS = {
    "distill": (["distill", "--no-track"], "drafter", "model.safetensors"),
    "heads-eagle": (["heads", "--kind", "eagle"], "heads", "heads.safetensors"),
    "heads-medusa-adversarial": (["heads", "--kind", "medusa", "--adversarial", "--set", "training.adv_warmup_steps=1"],
                                 "heads", "heads.safetensors"),
}


def train_argv(c: Campaign, kind: str, out: Path, data: Path, *extra: str) -> list[str]:
    argv, _, _ = TRAININGS[kind]
    return [*argv, "--config", str(c.config), "--data", str(data), "--out", str(out), *extra]


def tensors_equal(a: Path, b: Path) -> bool:
    """Two safetensors or torch.save files hold bitwise equal tensors (nested dicts and lists walked)."""
    import torch
    from safetensors.torch import load_file

    load = (lambda p: load_file(p)) if a.suffix == ".safetensors" else (lambda p: torch.load(p, weights_only=True))

    def eq(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(load(a), load(b))


def straight(c: Campaign, kind: str, data: Path) -> Path:
    out = c.out / f"straight-{kind}"
    if not (out / TRAININGS[kind][1] / TRAININGS[kind][2]).exists():
        shutil.rmtree(out, ignore_errors=True)
        r = c.koala(*train_argv(c, kind, out, data))
        if r.rc != 0:
            raise SystemExit(f"the uninterrupted {kind} run failed:\n{r.output[-3000:]}")
    return out


def compare_training(kind: str, got: Path, want: Path) -> dict:
    _, sub, weights = TRAININGS[kind]
    from koala.training.checkpoints import latest_checkpoint

    a, b = latest_checkpoint(got), latest_checkpoint(want)
    same = {"weights": tensors_equal(got / sub / weights, want / sub / weights)}
    for f in ("model.safetensors", "optimizer.pt", "adversary.pt", "trainer.pt"):
        if b is not None and (b / f).exists():
            same[f.split(".")[0]] = a is not None and (a / f).exists() and tensors_equal(a / f, b / f)
    return same


def train_kill(c: Campaign, kind: str, i: int, step: int, data: Path) -> dict:
    """Killed after optimizer step `step` (past the first checkpoint: killed earlier, --resume rightly finds
    nothing), resumed with --resume, compared bitwise with an uninterrupted run."""
    want = straight(c, kind, data)
    out = c.out / f"train-{kind}-{i:02d}"
    shutil.rmtree(out, ignore_errors=True)
    r = c.koala(*train_argv(c, kind, out, data), fault=f"train.step:{step}")
    again = c.koala(*train_argv(c, kind, out, data, "--resume"))
    same = compare_training(kind, out, want) if again.rc == 0 else {}
    res = {"trial": f"{kind}-kill-{i:02d}", "killed_after_step": step, "killed": r.rc == -signal.SIGKILL,
           "resume_rc": again.rc, "bitwise": same}
    res["ok"] = res["killed"] and again.rc == 0 and bool(same) and all(same.values())
    shutil.rmtree(out, ignore_errors=True)
    return res


def disk_full_checkpoint(c: Campaign, data: Path) -> dict:
    want = straight(c, "distill", data)
    out = c.out / "enospc-checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    r = c.koala(*train_argv(c, "distill", out, data), fault="checkpoint.write:2:enospc")
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    from koala.training.checkpoints import latest_checkpoint

    kept = latest_checkpoint(out)
    again = c.koala(*train_argv(c, "distill", out, data, "--resume"))
    same = compare_training("distill", out, want) if again.rc == 0 else {}
    res = {"trial": "disk-full-checkpoint", "rc": r.rc, "error": err[-1] if err else None,
           "checkpoint_kept": kept.name if kept else None, "resume_rc": again.rc, "bitwise": same}
    res["ok"] = r.rc == 1 and bool(err) and "free disk space" in err[-1] and kept is not None and \
        again.rc == 0 and bool(same) and all(same.values())
    shutil.rmtree(out, ignore_errors=True)
    return res


FOREIGN = [("distill", ["--set", "training.lr=0.01"], "another learning rate"),
           ("distill", ["--loss", "fkl"], "another loss"),
           ("distill", ["--steps", "4"], "other steps"),
           ("heads-eagle", ["--layers", "2"], "other layers")]


def foreign_resume(c: Campaign, i: int, data: Path) -> dict:
    kind, extra, what = FOREIGN[i]
    want = straight(c, kind, data)
    from tests.bad_inputs import snapshot

    before = snapshot(want)
    r = c.koala(*train_argv(c, kind, want, data, "--resume", *extra))
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    res = {"trial": f"foreign-resume-{kind}-{i}", "change": what, "rc": r.rc, "error": err[-1] if err else None,
           "unchanged": snapshot(want) == before, "traceback": "Traceback" in r.output}
    res["ok"] = r.rc == 1 and bool(err) and "another training" in err[-1] and res["unchanged"] and not res["traceback"]
    return res


# --- the pipeline ------------------------------------------------------------------------------------------------

PIPELINE_KILLS = [("data", "shard.rename:2"), ("training", "train.step:3"), ("evaluation", "eval.prompt:2"),
                  ("promotion", "registry.promote:1")]


def registry(c: Campaign, run_dir: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")


def versions_and_champion(c: Campaign, run_dir: Path) -> tuple[int, str | None]:
    client = registry(c, run_dir)
    models = client.search_registered_models()
    n = sum(len(client.search_model_versions(f"name='{m.name}'")) for m in models)
    champ = None
    for m in models:
        try:
            champ = str(client.get_model_version_by_alias(m.name, "champion").version)
        except Exception:  # noqa: BLE001 - no champion
            pass
    return n, champ


def pipeline_kill(c: Campaign, stage: str, fault: str) -> dict:
    run_dir = c.out / f"pipeline-{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["run", "--config", str(c.config), "--set", f"run_dir={run_dir}", "--set",
            f"sampling.out_dir={run_dir / 'data'}", "--set", f"training.out_dir={run_dir / 'drafter'}"]
    r = c.koala(*argv, fault=fault)
    orphans = orphans_after(r.pid)
    from koala.data import shards

    done = (shards.read_manifest(run_dir / "data") or shards.DatasetManifest()).done if (run_dir / "data").exists() else {}
    stamps = {f"data/{f}": (run_dir / "data" / f).stat().st_mtime_ns for f in done}  # finished: must be reused
    drafter = run_dir / "drafter" / "distill" / "drafter" / "model.safetensors"
    trained = drafter.stat().st_mtime_ns if drafter.exists() else None
    again = c.koala(*argv)
    reused = all((run_dir / k).stat().st_mtime_ns == t for k, t in stamps.items())
    if trained is not None:
        reused = reused and drafter.stat().st_mtime_ns == trained
    n, _ = versions_and_champion(c, run_dir) if (run_dir / "mlflow.db").exists() else (0, None)
    res = {"trial": f"pipeline-kill-{stage}", "fault": fault, "killed": r.rc == -signal.SIGKILL, "orphans": orphans,
           "rerun_rc": again.rc, "finished_stages_reused": reused, "model_versions": n}
    res["ok"] = res["killed"] and not orphans and again.rc == 0 and reused and n == 1
    if again.rc != 0:
        res["rerun_tail"] = again.output[-600:]
    return res


def pipeline_registry_fault(c: Campaign, point: str) -> dict:
    """MLflow failing once while registering (the task retries: still one version) or while promoting (refused:
    the champion stays)."""
    run_dir = c.out / f"pipeline-{point.replace('.', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["run", "--config", str(c.config), "--set", f"run_dir={run_dir}", "--set",
            f"sampling.out_dir={run_dir / 'data'}", "--set", f"training.out_dir={run_dir / 'drafter'}"]
    first = c.koala(*argv)  # a first version; make it champion, as if it had won
    client = registry(c, run_dir)
    name = client.search_registered_models()[0].name
    client.set_registered_model_alias(name, "champion", "1")
    # another candidate (other weights): the fault hits its registration or its promotion
    r = c.koala(*argv, "--set", "training.seed=1", fault=f"{point}:1:raise")
    n, champ = versions_and_champion(c, run_dir)
    res = {"trial": f"mlflow-fails-at-{point}", "first_rc": first.rc, "rc": r.rc, "model_versions": n,
           "champion": champ, "champion_unchanged": champ == "1"}
    if point == "registry.promote":
        tag = client.get_model_version(name, "2").tags.get("promotion_reason", "") if n >= 2 else ""
        res["reason"] = tag
        res["ok"] = first.rc == 0 and r.rc == 0 and n == 2 and champ == "1" and "registry error" in tag
    else:
        res["ok"] = first.rc == 0 and r.rc == 0 and n == 2 and champ in ("1", "2")
        res["champion_unchanged"] = None  # a retried registration goes on to a normal promotion decision
    return res


# --- bad inputs --------------------------------------------------------------------------------------------------

def bad_inputs(c: Campaign) -> list[dict]:
    from typer.testing import CliRunner

    from koala_flows.cli import app
    from tests.bad_inputs import CASES, prepare, snapshot

    d = c.out / "broken"
    shutil.rmtree(d, ignore_errors=True)
    prepare(d)
    cwd = c.out / "bad-inputs-cwd"
    cwd.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(cwd)
    out = []
    try:
        for name, argv, pattern in CASES:
            before, before_d = snapshot(cwd), snapshot(d)
            r = CliRunner().invoke(app, [a.replace("{d}", str(d)) for a in argv])
            lines = [x for x in r.output.strip().splitlines() if x.strip()]
            one = len(lines) == 1 and lines[0].startswith("error: ")
            ok = r.exit_code != 0 and one and bool(re.search(pattern, lines[0])) and snapshot(cwd) == before and \
                snapshot(d) == before_d
            out.append({"input": f"koala {name}", "message": lines[0] if lines else "",
                        "exit_code": r.exit_code, "ok": ok})
    finally:
        os.chdir(here)
    return out


# --- the campaign ------------------------------------------------------------------------------------------------

def summary(trials: list[dict], bad: list[dict]) -> dict:
    by = lambda prefix: [t for t in trials if t["trial"].startswith(prefix)]  # noqa: E731
    kills = by("sample-kill")
    sigs = [t for t in by("sigint") + by("sigterm") if t.get("stop_s") is not None]  # the run was interrupted
    trains = [t for t in trials if "-kill-" in t["trial"] and not t["trial"].startswith(("sample", "pipeline"))]
    trains += by("disk-full-checkpoint")
    data_trials = kills + sigs + by("disk-full-shard")
    return {
        "kills_survived": f"{sum(t['ok'] for t in kills)}/{len(kills)}",
        "interrupts_clean": f"{sum(t['ok'] for t in sigs)}/{len(sigs)}",
        "signals_after_the_run_ended": len(by("sigint") + by("sigterm")) - len(sigs),
        "orphans": sum(t.get("orphans", 0) for t in trials),
        "rows_lost": sum(t.get("lost", 0) for t in data_trials),
        "duplicates": sum(t.get("duplicates", 0) + t.get("extra", 0) for t in data_trials),
        "corrupt_shards": sum(t.get("corrupt", 0) for t in data_trials),
        "bitwise_resumes": f"{sum(t['ok'] for t in trains)}/{len(trains)}",
        "foreign_checkpoint_resumes_refused": f"{sum(t['ok'] for t in by('foreign'))}/{len(by('foreign'))}",
        "pipeline_kills_recovered": f"{sum(t['ok'] for t in by('pipeline-kill'))}/{len(by('pipeline-kill'))}",
        "mlflow_faults_no_champion_change": f"{sum(t['ok'] for t in by('mlflow'))}/{len(by('mlflow'))}",
        "disk_full_clean": f"{sum(t['ok'] for t in by('disk-full'))}/{len(by('disk-full'))}",
        "bad_inputs_one_line": f"{sum(b['ok'] for b in bad)}/{len(bad)}",
    }


def markdown(bad: list[dict]) -> str:
    """The bad-input table with what each case printed: input, message, exit code."""
    esc = lambda t: t.replace("|", "\\|")  # noqa: E731
    lines = ["| input | message | exit |", "|---|---|---|"]
    lines += [f"| `{esc(b['input'])}` | {esc(b['message'])} | {b['exit_code']} |" for b in bad]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="koala sample SIGKILLs")
    ap.add_argument("--signals", type=int, default=3, help="SIGINTs and as many SIGTERMs")
    ap.add_argument("--train-kills", type=int, default=2, help="kills per training kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/faults")
    ap.add_argument("--skip-pipeline", action="store_true", help="leave out the pipeline trials (the slowest)")
    ap.add_argument("--markdown", action="store_true", help="print OUT/faults.json's bad-input table as Markdown")
    a = ap.parse_args()
    from koala.threads import cpu_model

    if a.markdown:
        broken = str((Path(a.out) / "broken").resolve())
        print(markdown(json.loads((Path(a.out) / "faults.json").read_text())["bad_inputs"]).replace(broken, "{d}"))
        return

    c = Campaign(Path(a.out).resolve())
    log = c.out / "trials.jsonl"
    done = {json.loads(x)["trial"]: json.loads(x) for x in log.read_text().splitlines()} if log.exists() else {}
    rng = random.Random(a.seed)

    def trial(name: str, fn):
        if name not in done:
            t0 = time.monotonic()
            res = fn()
            res["wall_s"] = round(time.monotonic() - t0, 1)
            done[name] = res
            with open(log, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"{name}: {'ok' if res['ok'] else 'FAILED'} ({res['wall_s']} s)", file=sys.stderr, flush=True)
        return done[name]

    ref_dir, ref, ref_wall = c.reference()
    plan = []
    for i in range(a.kills):
        moment = kill_moment(c, rng, ref_wall)
        plan.append((f"sample-kill-{i:02d}", lambda i=i, moment=moment: sample_kill(c, i, moment, ref)))
    for sig in (signal.SIGINT, signal.SIGTERM):
        for i in range(a.signals):
            delay = rng.uniform(0.0, 0.08) * ref_wall  # after the plan is written: sampling takes the last seconds
            plan.append((f"{signal.Signals(sig).name.lower()}-{i:02d}",
                         lambda i=i, sig=sig, delay=delay: sample_signal(c, i, sig, delay, ref)))
    plan.append(("disk-full-shard", lambda: disk_full_shard(c, ref)))
    for kind in TRAININGS:
        for i in range(a.train_kills):
            step = rng.randint(c.checkpoint_every + 1, c.train_steps - 1)
            plan.append((f"{kind}-kill-{i:02d}", lambda kind=kind, i=i, step=step: train_kill(c, kind, i, step,
                                                                                               ref_dir)))
    plan.append(("disk-full-checkpoint", lambda: disk_full_checkpoint(c, ref_dir)))
    for i in range(len(FOREIGN)):
        plan.append((f"foreign-resume-{FOREIGN[i][0]}-{i}", lambda i=i: foreign_resume(c, i, ref_dir)))
    if not a.skip_pipeline:
        for stage, fault in PIPELINE_KILLS:
            plan.append((f"pipeline-kill-{stage}", lambda stage=stage, fault=fault: pipeline_kill(c, stage, fault)))
        for point in ("registry.register", "registry.promote"):
            plan.append((f"mlflow-fails-at-{point}", lambda point=point: pipeline_registry_fault(c, point)))
    trials = [trial(name, fn) for name, fn in plan]
    bad = bad_inputs(c)
    result = {"bench": "faults", "cpu": cpu_model(), "threads": os.cpu_count(), "seed": a.seed,
              "summary": summary(trials, bad), "trials": trials, "bad_inputs": bad}
    (c.out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("bench", "cpu", "summary")}, indent=2))
    m = result["summary"]
    print(f"kills survived {m['kills_survived']}, interrupts clean {m['interrupts_clean']}, orphans {m['orphans']}, "
          f"rows lost {m['rows_lost']}, duplicates {m['duplicates']}, corrupt shards {m['corrupt_shards']}, bitwise "
          f"resumes {m['bitwise_resumes']}, foreign-checkpoint resumes refused "
          f"{m['foreign_checkpoint_resumes_refused']}, pipeline kills recovered {m['pipeline_kills_recovered']}, "
          f"MLflow faults without a champion change {m['mlflow_faults_no_champion_change']}, full disks clean "
          f"{m['disk_full_clean']}, bad inputs {m['bad_inputs_one_line']} with one-line errors")


if __name__ == "__main__":
    main()
