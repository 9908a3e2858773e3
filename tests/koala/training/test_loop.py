"""The training loop: learning, bitwise resume, DDP equivalence, NaN handling, drafter building and reuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koala.training import losses
from koala.config import DrafterConfig, TrainingConfig
from koala.models.draft_model import build_drafter, default_copy_layers, save_drafter
from koala.errors import KoalaError
from koala.training.data import SequenceData
from koala.training.checkpoints import latest_checkpoint
from koala.training.loop import train
from koala.training.objectives import Distill, NextToken, adversarial_if
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[3]
V = 64


def synthetic_rows(n=24, seed=0, topk=None):
    """Sequences whose 'response' follows a fixed rule, with a teacher that knows it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(2, V, (6,), generator=g).tolist()
        resp = [(prompt[-1] + 3 * j) % V for j in range(1, 9)]
        row = {"prompt_id": f"p{i}", "input_ids": prompt + resp, "prompt_len": len(prompt)}
        if topk:
            # a teacher putting 0.9 on the rule's next token at every response position
            ids, lps = [], []
            for j in range(len(resp)):
                nxt = resp[j]
                others = [t for t in range(V) if t != nxt][:topk - 1]
                ids.append([nxt] + others)
                lps.append([torch.log(torch.tensor(0.9)).item()] + [torch.log(torch.tensor(0.1 / (topk - 1))).item()] * (topk - 1))
            row.update(topk_ids=ids, topk_logprobs=lps)
        rows.append(row)
    return rows


def fit(model, data, c, out, loss="fkl", mode="distill", steps=None, target_model=None, vocab_ids=None, **kw):
    """The loop as the recipes run it (koala.training.recipes), on a tiny model."""
    if mode == "pretrain":
        objective = NextToken(model)
    else:
        objective = adversarial_if(Distill(model, loss, target_model, vocab_ids), c, model.device)
    return train(objective, data, c, out, steps or c.steps, **kw)


def cfg(**kw):
    base = dict(steps=6, lr=3e-3, warmup_steps=2, batch_size=4, max_seq_len=32, checkpoint_every=3, eval_every=3,
                seed=0)
    return TrainingConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["fkl", "tvd", "tvdpp", "tvdpp_exact"])
def test_distillation_learns_the_teacher(tmp_path, loss):
    model = tiny_llama(layers=1, vocab=V, init_std=0.02)
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    held = SequenceData(synthetic_rows(n=8, seed=1, topk=4), 32, 0)
    m0 = fit(model, data, cfg(steps=1, eval_every=1), tmp_path / "a", loss=loss, heldout=held, progress=False)
    m = fit(model, data, cfg(steps=200, eval_every=200, lr=2e-2), tmp_path / "b", loss=loss, heldout=held,
              progress=False)
    # TVD (and exact TVD++, whose normalisation rescales the same gradient) learns slowly where the drafter puts
    # little mass; sampled TVD++ more slowly still: its draws from q score no reward where p is small
    gain = {"fkl": 0.2, "tvdpp_exact": 0.08, "tvd": 0.05, "tvdpp": 0.03}[loss]
    assert m["heldout_expected_acceptance"] > m0["heldout_expected_acceptance"] + gain


def test_teacher_over_a_draft_vocabulary_is_renormalised_and_drops_positions_without_mass():
    from koala.training.data import Batch
    from koala.training.objectives import teacher_at

    ids = torch.tensor([[5, 7, 9], [1, 2, 3]])  # row 1's stored top-k lies wholly outside the draft vocabulary
    lps = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    b = Batch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool),
              torch.zeros(2, dtype=torch.long), ids, lps)
    t, keep = teacher_at(b, None, V, torch.tensor([5, 9, 40]))
    assert keep.tolist() == [True, False]
    assert torch.allclose(t.p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0.0]]), atol=1e-6)


def test_distillation_over_a_draft_vocabulary_learns_and_stays_in_it(tmp_path):
    model = tiny_llama(layers=1, vocab=V, init_std=0.02)
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    held = SequenceData(synthetic_rows(n=8, seed=1, topk=4), 32, 0)
    m = fit(model, data, cfg(steps=200, eval_every=200, lr=2e-2), tmp_path, loss="fkl", heldout=held,
              progress=False, vocab_ids=torch.arange(0, V, 2))  # the even half: the rule's odd tokens are lost
    # held-out metrics are over the full vocabulary, as the engine drafts: about half the positions are reachable
    assert 0.3 < m["heldout_greedy_agreement"] < 0.7


def test_pretraining_loss_decreases(tmp_path):
    model = tiny_llama(layers=1, vocab=V)
    logged = []
    rows = [{**r, "prompt_len": 1} for r in synthetic_rows()]
    fit(model, SequenceData(rows, 32, 0), cfg(lr=1e-2), tmp_path, mode="pretrain", steps=30,
          on_log=lambda s, m: logged.append(m["loss"]), progress=False)
    assert logged[-1] < 0.7 * logged[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_is_bitwise_identical(tmp_path, dtype):
    """Within one compute dtype (bf16 autocast included: float32 master weights and optimizer state)."""
    from koala.precision import ComputeDtype

    compute = ComputeDtype(dtype, "test")
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    straight = tiny_llama(layers=1, vocab=V, seed=3)
    fit(straight, data, cfg(), tmp_path / "straight", loss="fkl", progress=False, compute=compute)

    class Killed(Exception):
        pass

    def kill_after_3(step, m):
        if step == 3:
            raise Killed

    first = tiny_llama(layers=1, vocab=V, seed=3)
    with pytest.raises(Killed):
        fit(first, data, cfg(), tmp_path / "resumed", loss="fkl", on_log=kill_after_3, progress=False,
            compute=compute)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000003"
    fresh = tiny_llama(layers=1, vocab=V, seed=99)  # different init: everything must come from the checkpoint
    fit(fresh, data, cfg(), tmp_path / "resumed", loss="fkl", resume=True, progress=False, compute=compute)
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights stay float32 under autocast
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_another_training_are_refused_or_set_aside(tmp_path):
    """Same out_dir, another fingerprint (target, config, data or starting weights): --resume refuses with one line
    and leaves everything as it was; a retried task (resume="auto") and a fresh start set them aside and start
    over, never handing back the other training's weights; the same fingerprint, finished, resumes to its held-out
    metrics instead of nothing."""
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    held = SequenceData(synthetic_rows(n=8, seed=1, topk=4), 32, 0)
    first = tiny_llama(layers=1, vocab=V, seed=3)
    fit(first, data, cfg(), tmp_path / "out", loss="fkl", progress=False, fingerprint="stage-a")
    before_files = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    other = tiny_llama(layers=1, vocab=V, seed=5)
    with pytest.raises(KoalaError, match="belong to another training.*drop --resume"):
        fit(other, data, cfg(steps=3), tmp_path / "out", loss="fkl", resume=True, progress=False,
              fingerprint="stage-b")
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == before_files
    before = {k: v.clone() for k, v in other.state_dict().items()}
    logged = []
    fit(other, data, cfg(steps=3), tmp_path / "out", loss="fkl", resume="auto", progress=False,
          fingerprint="stage-b", on_log=lambda step, m: logged.append(step))
    assert logged == [1, 2, 3]  # trained from its own start, not resumed at step 6 of stage a
    assert any(not torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert list((tmp_path / "out").glob("checkpoints.stale-*"))
    again = tiny_llama(layers=1, vocab=V, seed=7)
    m = fit(again, data, cfg(steps=3), tmp_path / "out", loss="fkl", resume=True, progress=False,
              fingerprint="stage-b", heldout=held)
    assert "heldout_expected_acceptance" in m  # finished already: metrics recomputed, weights from its checkpoint
    a, b = load_file(latest_checkpoint(tmp_path / "out") / "model.safetensors"), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(KoalaError, match="holds no checkpoint to continue: drop --resume"):
        fit(tiny_llama(layers=1, vocab=V), SequenceData(synthetic_rows(topk=4), 32, 0), cfg(), tmp_path / "none",
              loss="fkl", resume=True, progress=False, fingerprint="x")
    assert not (tmp_path / "none" / "checkpoints").exists() or not list((tmp_path / "none" / "checkpoints").glob("step-*"))


def test_a_fresh_start_never_mixes_with_older_checkpoints(tmp_path):
    """Without --resume, earlier checkpoints in out_dir (even this training's) are set aside: pruning by name would
    otherwise keep the old run's later steps and delete the new ones."""
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    fit(tiny_llama(layers=1, vocab=V, seed=3), data, cfg(), tmp_path, loss="fkl", progress=False, fingerprint="a")
    model = tiny_llama(layers=1, vocab=V, seed=4)
    fit(model, data, cfg(steps=3), tmp_path, loss="fkl", progress=False, fingerprint="a")
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-0000003"]
    a = load_file(latest_checkpoint(tmp_path) / "model.safetensors")
    assert all(torch.equal(a[k], v) for k, v in model.state_dict().items())
    fit(tiny_llama(layers=1, vocab=V, seed=5), data, cfg(steps=3), tmp_path, loss="fkl", progress=False,
          fingerprint="a")
    kept = sorted(p.name for p in tmp_path.glob("checkpoints.stale-*"))
    assert len(kept) == 2, kept  # each set-aside training kept, none overwritten


def test_adversarial_resume_is_bitwise_identical_discriminator_included(tmp_path):
    """KOALA's discriminator (weights, optimizer, collapse counter) is checkpointed with the drafter."""
    from koala.interrupt import Interrupted

    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    c = cfg(adversarial=True, adv_warmup_steps=1, adv_lambda=0.1)
    straight = tiny_llama(layers=1, vocab=V, seed=3)
    fit(straight, data, c, tmp_path / "straight", loss="fkl", progress=False, target_model=tiny_llama(vocab=V))

    def stop_after_3(step, m):
        if step == 3:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        fit(tiny_llama(layers=1, vocab=V, seed=3), data, c, tmp_path / "resumed", loss="fkl", progress=False,
              target_model=tiny_llama(vocab=V), on_log=stop_after_3)
    fit(tiny_llama(layers=1, vocab=V, seed=99), data, c, tmp_path / "resumed", loss="fkl", resume=True,
          progress=False, target_model=tiny_llama(vocab=V))
    for name in ("model.safetensors",):
        a = load_file(latest_checkpoint(tmp_path / "straight") / name)
        b = load_file(latest_checkpoint(tmp_path / "resumed") / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    da = torch.load(latest_checkpoint(tmp_path / "straight") / "adversary.pt", weights_only=True)
    db = torch.load(latest_checkpoint(tmp_path / "resumed") / "adversary.pt", weights_only=True)
    assert all(torch.equal(da["disc"][k], db["disc"][k]) for k in da["disc"])
    sa, sb = da["opt"]["state"], db["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.LOSSES["fkl"]

    def poisoned(s, t):
        calls["n"] += 1
        return real(s, t) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setitem(losses.LOSSES, "fkl", poisoned)
    model = tiny_llama(layers=1, vocab=V)
    with pytest.raises(KoalaError, match="loss became nan at step 5.*step-0000003"):
        fit(model, SequenceData(synthetic_rows(topk=4), 32, 0), cfg(), tmp_path, loss="fkl", progress=False)
    assert latest_checkpoint(tmp_path).name == "step-0000003"


def _clocked(monkeypatch, seconds_per_step: list[float]):
    """A clock that advances seconds_per_step[0] per training step (one micro-batch: one loss call)."""
    import types

    import koala.training.loop as loop

    clock = [0.0]
    real = losses.LOSSES["fkl"]

    def timed(s, t):
        clock[0] += seconds_per_step[0]
        return real(s, t)

    monkeypatch.setitem(losses.LOSSES, "fkl", timed)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))


def test_a_budgeted_training_runs_the_steps_that_fit_under_a_schedule_planned_over_them(tmp_path, monkeypatch):
    """training.max_minutes: 2 steps, then PLAN_TIMED timed; at 1 s a step 8 s are spent and 22 more steps fit in
    30 s; the learning rate holds at its peak until then and its cosine decay ends at the 30th step, not the 100th;
    a resumed training (on a machine three times slower) keeps the plan: bitwise the straight run."""
    from koala.training.loop import PLAN_FILE

    speed = [1.0]
    _clocked(monkeypatch, speed)
    data = SequenceData(synthetic_rows(topk=4), 32, 0)
    c = cfg(steps=100, max_minutes=0.5, warmup_steps=2)
    lrs = {}
    got = fit(tiny_llama(layers=1, vocab=V, seed=3), data, c, tmp_path / "straight", loss="fkl", progress=False,
              on_log=lambda step, m: lrs.__setitem__(step, m["lr"]))
    assert got["steps_run"] == 30 and max(lrs) == 30
    assert latest_checkpoint(tmp_path / "straight").name == "step-0000030"
    plan = json.loads((tmp_path / "straight" / "checkpoints" / PLAN_FILE).read_text())
    assert (plan["steps"], plan["planned"], plan["s_per_step"]) == (100, 30, 1.0)
    assert lrs[8] == pytest.approx(c.lr) and lrs[9] < c.lr  # the peak holds until the plan, after step 8
    assert lrs[30] == pytest.approx(0.1 * c.lr, rel=1e-3) and lrs[10] > 0.6 * c.lr  # decayed over the 30

    class Killed(Exception):
        pass

    def kill_at_12(step, m):
        if step == 12:
            speed[0] = 3.0  # slower from here on: a re-plan would fit fewer steps
            raise Killed

    with pytest.raises(Killed):
        fit(tiny_llama(layers=1, vocab=V, seed=3), data, c, tmp_path / "resumed", loss="fkl", progress=False,
            on_log=kill_at_12)
    again = fit(tiny_llama(layers=1, vocab=V, seed=99), data, c, tmp_path / "resumed", loss="fkl", resume=True,
                progress=False)
    assert again["steps_run"] == 30
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000030"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budgeted_training_plans_again_as_its_steps_slow(tmp_path, monkeypatch):
    """The first plan (1 s a step: 30 steps in 30 s) holds while the rate does; from step 13 each step takes 3 s (as
    held-out evaluations, checkpoints or a drifting step rate would). The training plans again at each checkpoint
    (every 3 steps) from the second after its plan on, at the rate since the one before: at step 15 the 9 s left
    hold 3 more steps, and it ends at 18 steps and 30 s where the first plan would have run to 66 s, its learning
    rate decayed to the floor at its last step. A resume from a checkpoint runs the plan made there."""
    from koala.training.loop import PLAN_FILE

    speed = [1.0]
    _clocked(monkeypatch, speed)
    c = cfg(steps=100, max_minutes=0.5, warmup_steps=2)
    lrs = {}

    def log(step, m):
        lrs[step] = m["lr"]
        if step == 12:
            speed[0] = 3.0

    got = fit(tiny_llama(layers=1, vocab=V, seed=3), SequenceData(synthetic_rows(topk=4), 32, 0), c,
              tmp_path / "straight", loss="fkl", progress=False, on_log=log)
    assert got["steps_run"] == 18 and 12 + (18 - 12) * 3 == 30
    plan = json.loads((tmp_path / "straight" / "checkpoints" / PLAN_FILE).read_text())
    assert (plan["planned"], plan["s_per_step"]) == (18, 3.0)
    assert lrs[18] == pytest.approx(0.1 * c.lr, rel=1e-3)
    assert latest_checkpoint(tmp_path / "straight").name == "step-0000018"

    class Killed(Exception):
        pass

    def kill_at_15(step, m):
        log(step, m)
        if step == 15:  # after the plan made at step 15's checkpoint
            raise Killed

    speed[0] = 1.0
    with pytest.raises(Killed):
        fit(tiny_llama(layers=1, vocab=V, seed=3), SequenceData(synthetic_rows(topk=4), 32, 0), c,
            tmp_path / "resumed", loss="fkl", progress=False, on_log=kill_at_15)
    again = fit(tiny_llama(layers=1, vocab=V, seed=99), SequenceData(synthetic_rows(topk=4), 32, 0), c,
                tmp_path / "resumed", loss="fkl", resume=True, progress=False)
    assert again["steps_run"] == 18
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000018"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_that_fits_every_step_runs_them_all(tmp_path, monkeypatch):
    _clocked(monkeypatch, [1.0])
    got = fit(tiny_llama(layers=1, vocab=V, seed=3), SequenceData(synthetic_rows(topk=4), 32, 0),
              cfg(steps=12, max_minutes=10), tmp_path, loss="fkl", progress=False)
    assert got["steps_run"] == 12 and latest_checkpoint(tmp_path).name == "step-0000012"


def test_empty_dataset_is_an_error():
    with pytest.raises(KoalaError, match="training set is empty"):
        SequenceData([], 32, 0)


def test_fewer_sequences_per_micro_batch_than_ranks_is_an_error(tmp_path, monkeypatch):
    import koala.training.loop as loop

    monkeypatch.setattr(loop, "world", lambda: (0, 4))
    model = tiny_llama(layers=1, vocab=64, seed=5)
    with pytest.raises(KoalaError, match="training.batch_size 2 is smaller than the 4 DDP ranks"):
        fit(model, SequenceData(synthetic_rows(topk=4), 32, 0), cfg(batch_size=2), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


DDP_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from koala.training.data import SequenceData
from koala.training.loop import init_distributed
from koala.config import TrainingConfig
from tests.conftest import tiny_llama
from tests.koala.training.test_loop import fit, synthetic_rows
init_distributed()
torch.set_num_threads(1)
model = tiny_llama(layers=1, vocab=64, seed=5)
log = []
# two micro-batches per step: under DDP the first runs under no_sync, the gradients are all-reduced once
cfg = TrainingConfig(steps=5, lr=3e-3, warmup_steps=1, batch_size=4, grad_accum=2, max_seq_len=32,
                     checkpoint_every=100, eval_every=100)
fit(model, SequenceData(synthetic_rows(topk=4), 32, 0), cfg, sys.argv[2], loss="fkl",
      on_log=lambda s, m: log.append(m["loss"]), progress=False)
if log:
    print("LOSSES" + json.dumps(log))

# adversarial EAGLE K=2 heads, two unrolled drafts: DDP runs the unrolled drafts, the ranks share one discriminator
import hashlib
from koala.models.heads import build_heads
from koala.training.loop import train, world
from koala.training.features import FeatureSource
from koala.training.heads_objectives import heads_objective
from koala.training.objectives import adversarial_if
target = tiny_llama(layers=2, vocab=64, hidden=32, seed=0)
target.requires_grad_(False)
data = SequenceData(synthetic_rows(n=16), 32, 0)
torch.manual_seed(0)
head = build_heads("eagle", target, layers=2)
cfg = TrainingConfig(steps=4, lr=3e-3, warmup_steps=1, batch_size=4, grad_accum=2, max_seq_len=32, unroll=2,
                     adversarial=True, adv_warmup_steps=0, adv_lambda=0.1, checkpoint_every=100, eval_every=100)
obj = adversarial_if(heads_objective("eagle", head, target, FeatureSource(target, data, cache=True), unroll=2),
                     cfg, "cpu")
log = []
train(obj, data, cfg, sys.argv[2] + "/heads", cfg.steps, progress=False, on_log=lambda s, m: log.append(m["loss"]))
digest = lambda m: hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()
with open(f"{sys.argv[2]}/heads-rank{world()[0]}.json", "w") as f:  # a file each: ranks' stdout lines interleave
    json.dump({"rank": world()[0], "losses": log, "head": digest(head), "disc": digest(obj.adversary.disc)}, f)
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """Distillation, then adversarial EAGLE heads (unrolled drafts), on 2 gloo ranks: the losses of one process over
    the whole batch; the heads and the discriminator end equal on both ranks (one model, one discriminator)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def results(cmd):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        losses = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("LOSSES"))[6:])
        return losses, [json.loads(f.read_text()) for f in sorted(Path(cmd[-1]).glob("heads-rank*.json"))]

    one, [heads_one] = results([sys.executable, str(script), str(ROOT), str(tmp_path / "one")])
    two, heads_two = results([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--standalone", str(script), str(ROOT), str(tmp_path / "two")])
    assert len(one) == len(two) == 5
    assert all(abs(a - b) < 1e-4 * max(1, abs(a)) for a, b in zip(one, two)), (one, two)
    assert [r["rank"] for r in heads_two] == [0, 1]
    assert heads_two[0]["head"] == heads_two[1]["head"] and heads_two[0]["disc"] == heads_two[1]["disc"]
    a, b = heads_one["losses"], heads_two[0]["losses"]
    assert len(a) == len(b) == 4 and all(abs(x - y) < 1e-4 * max(1, abs(x)) for x, y in zip(a, b)), (a, b)


def test_default_copy_layers():
    assert default_copy_layers(30, 2) == [0, 29]
    assert default_copy_layers(30, 1) == [29]
    assert default_copy_layers(30, 4) == [0, 10, 19, 29]


def test_hidden_size_that_cannot_share_embeddings(default_target):
    with pytest.raises(KoalaError, match="hidden size 128 cannot share the target's embeddings \\(576\\)"):
        build_drafter(default_target, DrafterConfig(layers=2, hidden_size=128, num_heads=4, num_kv_heads=2))


@pytest.mark.slow
def test_saved_drafter_reloads_and_is_a_lossless_assistant(default_session, tmp_path):
    s = default_session
    d = build_drafter(s.target, DrafterConfig(layers=2))
    assert d.model.embed_tokens.weight.requires_grad is False
    path = save_drafter(d, s.target.tokenizer, tmp_path / "drafter", {"target": s.target.info.name})
    assert (path / "model.safetensors").exists() and (path / "koala.json").exists()
    from transformers import AutoModelForCausalLM

    from koala.targets import encode_chat
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([encode_chat(s.target.tokenizer, [{"role": "user", "content": "Name three colours."}])])
    kw = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    plain = s.target.model.generate(ids, **kw)
    assisted = s.target.model.generate(ids, assistant_model=reloaded, **kw)
    assert torch.equal(plain, assisted)
    engine_drafter = s.drafter(str(path))
    ar = s.run(ids[0].tolist(), 20)
    assert s.run(ids[0].tolist(), 20, drafter=engine_drafter, gamma=3).tokens == ar.tokens


def test_unattended_training_logs_its_rate_and_eta(tmp_path, monkeypatch):
    """A worker's log is not a terminal: given a log function, the loop writes the bar's line to it (steps done, rate,
    time left) at most every PROGRESS_LOG_S seconds, and once at the end."""
    import koala.training.loop as L

    rows = [{**r, "prompt_len": 1} for r in synthetic_rows()]
    monkeypatch.setattr(L, "PROGRESS_LOG_S", 0.0)
    lines: list[str] = []
    fit(tiny_llama(layers=1, vocab=V), SequenceData(rows, 32, 0), cfg(), tmp_path, mode="pretrain",
        progress=lines.append)
    assert len(lines) > 2 and all("\r" not in ln for ln in lines)
    assert "6/6" in lines[-1] and "step" in lines[-1] and "<" in lines[-1]  # done of total, rate, elapsed<left
    monkeypatch.setattr(L, "PROGRESS_LOG_S", 3600.0)
    quiet: list[str] = []
    fit(tiny_llama(layers=1, vocab=V), SequenceData(rows, 32, 0), cfg(), tmp_path / "again", mode="pretrain",
        progress=quiet.append)
    assert len(quiet) <= 2  # the first line and the last
