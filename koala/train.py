"""One training loop for drafter pretraining (next-token loss) and distillation (a loss between p and q).

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA, resumable
checkpoints (weights, optimizer, scheduler, RNG states and data position, written atomically), DDP under torchrun.
Metrics leave through `on_log(step, metrics)`; nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.interrupt import check, fault
from koala.io import write_text_atomic
from koala.losses import LOSSES, Teacher, cross_entropy, expected_acceptance, greedy_agreement

LogFn = Callable[[int, dict], None]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T) bool: positions whose next token is trained on
    targets: torch.Tensor  # (N,) the next tokens at those positions, row-major
    topk_ids: torch.Tensor | None = None  # (N, k) the teacher's stored top-k at those positions
    topk_logprobs: torch.Tensor | None = None
    rows: list[int] | None = None  # indices of the rows in the SequenceData (feature caches look them up)

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])


class SequenceData:
    """Token sequences with the span trained on (the response, or everything when pretraining)."""

    def __init__(self, rows: list[dict], max_seq_len: int, pad_id: int):
        if not rows:
            raise KoalaError("the training set is empty: build a distillation set with `koala sample` first")
        self.rows, self.max_len, self.pad = rows, max_seq_len, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int], device) -> Batch:
        rows = [self.rows[i] for i in idx]
        T = min(self.max_len, max(len(r["input_ids"]) for r in rows))
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        att = torch.zeros(len(rows), T, dtype=torch.long)
        pos = torch.zeros(len(rows), T, dtype=torch.bool)
        targets, tk_i, tk_v = [], [], []
        for b, r in enumerate(rows):
            seq = r["input_ids"][:T]
            ids[b, :len(seq)] = torch.tensor(seq)
            att[b, :len(seq)] = 1
            start = max(r.get("prompt_len", 1) - 1, 0)  # position P-1 predicts the first response token
            stop = len(seq) - 1
            if stop > start:
                pos[b, start:stop] = True
                targets.append(torch.tensor(seq[start + 1:stop + 1]))
                if r.get("topk_ids") is not None:
                    tk_i.append(torch.tensor(r["topk_ids"][:stop - start]))
                    tk_v.append(torch.tensor(r["topk_logprobs"][:stop - start], dtype=torch.float32))
        cat = lambda xs: torch.cat(xs).to(device) if xs else None  # noqa: E731
        return Batch(ids.to(device), att.to(device), pos.to(device), cat(targets) if targets else
                     torch.zeros(0, dtype=torch.long, device=device), cat(tk_i), cat(tk_v), list(idx))


# --- checkpoints ---------------------------------------------------------------------------------------------------

def save_checkpoint(out_dir: Path, step: int, model, opt, sched, data_pos: dict, keep: int = 2,
                    adversary=None) -> Path:
    """Write checkpoints/step-N atomically (a directory renamed into place) and keep the last `keep`.

    With an adversary (KOALA's discriminator), its weights, optimizer and collapse counter go in too: a resumed
    adversarial training continues bitwise as if never stopped.
    """
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        state = {k: v.detach().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        if adversary is not None:
            torch.save(adversary.state_dict(), tmp / "adversary.pt")
        fault("checkpoint.write")
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():  # CUDA draws (feature noise on a GPU) resume bitwise too
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"scheduler": sched.state_dict(), "step": step, "data": data_pos, **rng}, tmp / "trainer.pt")
    except Exception as e:  # noqa: BLE001 - a full disk is OSError, torch's RuntimeError or safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out_dir)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KoalaError(f"could not write checkpoint step {step} under {root} ({why}): free disk space and resume "
                         f"with --resume; the last checkpoint is kept ({last or 'none yet'})") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = [d for d in sorted((out_dir / "checkpoints").glob("step-*")) if (d / "trainer.pt").exists()]
    return done[-1] if done else None


FINGERPRINT = "fingerprint.txt"


def claim_checkpoints(out_dir: Path, fingerprint: str | None, resume: bool | str = "auto") -> None:
    """Make out_dir's checkpoints this training's, as `resume` says.

    A fingerprint names what a training is (target, config, data, starting weights): resuming another training's
    checkpoint would hand back the wrong drafter under this one's name.

    resume:
        True: continue this training (`--resume`). Refused, with out_dir untouched, when there is no checkpoint or
            when they belong to another training (or carry no fingerprint).
        "auto": continue this training's checkpoints if there are some (a retried task); set others' aside.
        False: start over; any checkpoints there are set aside (checkpoints.stale-*), never mixed with the new ones.

    Raises:
        KoalaError: resume=True and nothing of this training's to continue.
    """
    root = out_dir / "checkpoints"
    f = root / FINGERPRINT
    stored = f.read_text().strip() if f.exists() else None
    have = latest_checkpoint(out_dir) is not None
    ours = have and (fingerprint is None or stored == fingerprint)
    if resume is True and not have:
        raise KoalaError(f"--resume: {out_dir} holds no checkpoint to continue: drop --resume to start a new training "
                         "there")
    if resume is True and not ours:
        whose = "carry no fingerprint (written by an older koala)" if stored is None else \
            "belong to another training (target, data, config or starting weights differ)"
        raise KoalaError(f"--resume: the checkpoints in {out_dir} {whose}: drop --resume to start over there (they "
                         "are set aside), or choose another --out")
    if have and (resume is False or not ours):
        base = out_dir / f"checkpoints.stale-{(stored or 'unknown')[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
        stale, n = base, 1
        while stale.exists():  # never overwrite a set-aside training: it may be the long one
            stale, n = base.with_name(f"{base.name}.{n}"), n + 1
        root.rename(stale)
        why = "an earlier run of this training" if ours else "another training's (target, config, data or starting " \
              "weights differ)"
        print(f"{root} held {why} checkpoints: moved to {stale.name}, starting over")
    if fingerprint is not None:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(f, fingerprint + "\n")


def load_checkpoint(ckpt: Path, model, opt, sched, adversary=None) -> tuple[int, dict]:
    """Restore a checkpoint exactly (every weight must fit: strict); returns (step, data position).

    Raises:
        KoalaError: the checkpoint is damaged or was written for another architecture.
    """
    try:
        unwrap(model).load_state_dict(load_file(ckpt / "model.safetensors",
                                                device=str(next(model.parameters()).device)), strict=True)
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        if adversary is not None:
            adversary.load_state_dict(torch.load(ckpt / "adversary.pt", weights_only=True))
        t = torch.load(ckpt / "trainer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and pickle each raise their own types
        if isinstance(e, KoalaError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KoalaError(f"checkpoint {ckpt} does not fit this training ({first}): drop --resume to start over, or "
                         "choose another --out") from None
    sched.load_state_dict(t["scheduler"])
    torch.set_rng_state(t["rng"])
    if "cuda_rng" in t and torch.cuda.is_available() and len(t["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(t["cuda_rng"])
    return t["step"], t["data"]


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# --- the loop ----------------------------------------------------------------------------------------------------

def schedule(cfg: TrainingConfig, steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class DataOrder:
    """A seeded permutation per epoch and a position in it: all a resume needs to continue the same data order."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._make()

    def _make(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


class StudentAtPositions(torch.nn.Module):
    """A causal LM that returns logits only where the loss needs them: the head is most of a drafter's cost.

    With `vocab_ids` (K,), the logits cover only those tokens (the draft vocabulary), K/V of the head's cost.
    """

    def __init__(self, lm, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.lm = lm
        self.vocab_ids = vocab_ids

    def forward(self, input_ids, attention_mask, positions):
        h = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        if self.vocab_ids is None:
            return self.lm.lm_head(h[positions])  # (N, V)
        return torch.nn.functional.linear(h[positions], self.lm.lm_head.weight[self.vocab_ids])  # (N, K)


@torch.no_grad()
def teacher_at(batch: Batch, target_model, vocab: int, vocab_ids: torch.Tensor | None = None
               ) -> tuple[Teacher, torch.Tensor | None]:
    """The target's distribution at the trained positions: from the stored top-k, or a forward of the target.

    With `vocab_ids` (K,), the distribution is restricted to those tokens and renormalised, and the second value
    marks the positions where the teacher puts any (stored) mass on them; the others teach nothing and are dropped.
    """
    if batch.topk_ids is not None:
        if vocab_ids is None:
            return Teacher.from_topk(batch.topk_ids, batch.topk_logprobs, vocab), None
        return Teacher.from_topk_over(batch.topk_ids, batch.topk_logprobs, vocab_ids, vocab)
    if target_model is None:
        raise KoalaError("the dataset has no stored top-k log-probs and no target was given: sample with "
                         "sampling.topk_logprobs > 0 or train with the target loaded")
    logits = target_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.positions]
    return Teacher.from_logits(logits if vocab_ids is None else logits[:, vocab_ids]), None


class DraftModelObjective:
    """Distillation (a loss between p and q) or pretraining (next token) of an independent drafter."""

    def __init__(self, lm, mode: str, loss_name: str, target_model=None, adversary=None,
                 vocab_ids: torch.Tensor | None = None):
        ids = None if vocab_ids is None or mode == "pretrain" else vocab_ids.to(lm.device)
        self.module = StudentAtPositions(lm, ids)  # replaced by its DDP wrapper under torchrun
        self.mode, self.loss_name, self.target, self.adversary = mode, loss_name, target_model, adversary
        self.vocab, self.vocab_ids = lm.config.vocab_size, ids

    def loss(self, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        logits = self.module(b.input_ids, b.attention_mask, b.positions)
        if self.mode == "pretrain":
            return cross_entropy(logits, b.targets), {}
        teacher, keep = teacher_at(b, self.target, self.vocab, self.vocab_ids)
        if keep is not None:
            logits = logits[keep]
        value = LOSSES[self.loss_name](logits, teacher)
        if self.adversary is None:
            return value, {}
        real, fake = self.adversary.profiles(teacher.logp, torch.log_softmax(logits.float(), -1))
        adv, extra = self.adversary.step(real, fake, step)
        return value + adv, extra

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        """Over the full vocabulary, as the engine drafts: q is zero outside the draft vocabulary."""
        logits = self.module(b.input_ids, b.attention_mask, b.positions)
        if self.vocab_ids is not None:
            full = logits.new_full((logits.shape[0], self.vocab), -1e4)
            logits = full.index_copy_(-1, self.vocab_ids, logits)
        t, _ = teacher_at(b, self.target, self.vocab)
        return {"heldout_expected_acceptance": float(expected_acceptance(logits, t)),
                "heldout_greedy_agreement": float(greedy_agreement(logits, t))}


@torch.no_grad()
def heldout_metrics(objective, data: SequenceData | None, device, limit: int = 64) -> dict:
    """Position-weighted means of the objective's held-out metrics (expected acceptance, greedy agreement)."""
    if data is None or len(data) == 0:
        return {}
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, min(len(data), limit), 8):
        b = data.batch(list(range(i, min(i + 8, len(data), limit))), device)
        if b.n == 0:
            continue
        for k, v in objective.metrics(b).items():
            sums[k] = sums.get(k, 0.0) + v * b.n
        n += b.n
    return {k: v / n for k, v in sums.items()} if n else {}


def train(model, data: SequenceData, cfg: TrainingConfig, out_dir: str | Path, mode: str = "distill",
          steps: int | None = None, loss: str | None = None, target_model=None, heldout: SequenceData | None = None,
          resume: bool | str = False, on_log: LogFn | None = None, progress: bool = True, objective=None,
          vocab_ids: torch.Tensor | None = None, fingerprint: str | None = None) -> dict:
    """Train `model` (a Hugging Face causal LM) in place; returns the last logged metrics.

    Args:
        model: the drafter; parameters with requires_grad=False stay frozen.
        data: training sequences; each step takes batch_size * grad_accum of them (split across DDP ranks).
        cfg: the training section of the config.
        out_dir: checkpoints go under out_dir/checkpoints.
        mode: "distill" (a loss between the target's and the drafter's distributions) or "pretrain" (next token).
        steps: optimizer steps (default: cfg.steps, or cfg.pretrain_steps when pretraining).
        loss: fkl, rkl, tvd, tvdpp or jsd (default: cfg.loss).
        target_model: the target, for teacher distributions when the data has no stored top-k.
        heldout: sequences for the held-out expected acceptance.
        resume: True: continue this training's last checkpoint in out_dir (refused if there is none, or if it is
            another training's); "auto": continue it if there is one; False: start over (see claim_checkpoints).
        on_log: called with (step, metrics) every step.
        objective: what a step minimises (default: a DraftModelObjective for `mode`); draft heads bring their own.
        vocab_ids: distil over these tokens only (the draft vocabulary, sorted ids), renormalising the teacher.
        fingerprint: what this training is (config, data, starting weights); checkpoints of another are not resumed.

    Raises:
        KoalaError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    out = Path(out_dir)
    steps = steps or (cfg.pretrain_steps if mode == "pretrain" else cfg.steps)
    loss_name = loss or cfg.loss
    rank, world_size = world()
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    objective = objective or _draft_model_objective(model, cfg, mode, loss_name, target_model, vocab_ids, device)
    params, opt, sched = _optimizer(objective, model, cfg, steps, world_size)
    adversary = getattr(objective, "adversary", None)
    start, order = _starting_point(out, resume, fingerprint, model, opt, sched, len(data), cfg.seed, adversary)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    metrics: dict = {}
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=mode, disable=not progress or rank != 0)
    for step in bar:
        check()  # SIGINT/SIGTERM: stop between optimizer steps (the last checkpoint is kept)
        t0 = time.perf_counter()
        micro = [order.take(cfg.batch_size) for _ in range(cfg.grad_accum)]  # the global batch of this step
        total, tokens, extra = _backward(objective, data, micro, step, autocast, out, mode, device)
        grad_norm = _optimizer_step(opt, sched, params, cfg.grad_clip)
        fault("train.step")
        metrics = {"loss": total / max(tokens, 1), "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "tokens_per_s": tokens / (time.perf_counter() - t0), **extra}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            metrics.update(heldout_metrics(objective, heldout, device))
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps) and rank == 0:
            save_checkpoint(out, step + 1, model, opt, sched, order.state(), adversary=adversary)
            fault("train.checkpoint")
        if on_log and rank == 0:
            on_log(step + 1, metrics)
        if world_size > 1:
            dist.barrier()
    if start >= steps:  # resumed a finished training: its held-out metrics again, not nothing
        metrics = heldout_metrics(objective, heldout, device)
    return metrics


def _optimizer(objective, model, cfg: TrainingConfig, steps: int, world_size: int):
    """The trainable parameters, AdamW and the schedule (the objective wrapped in DDP under torchrun)."""
    if world_size > 1:
        objective.module = torch.nn.parallel.DistributedDataParallel(objective.module)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg, steps))


def _optimizer_step(opt, sched, params, clip: float) -> torch.Tensor:
    """Clip the global gradient norm, step the optimizer and the schedule; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _starting_point(out: Path, resume: bool | str, fingerprint: str | None, model, opt, sched, n: int, seed: int,
                    adversary=None) -> tuple[int, DataOrder]:
    """(first step, data order): step 0, or where this training's last checkpoint left off (never another's)."""
    err = None
    if world()[0] == 0:
        try:
            claim_checkpoints(out, fingerprint, resume)
        except KoalaError as e:
            err = str(e)
    if world()[1] > 1:  # every rank learns rank 0's verdict (and waits for foreign checkpoints to be set aside)
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise KoalaError(err)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is None:
        return 0, DataOrder(n, seed)
    start, pos = load_checkpoint(ckpt, model, opt, sched, adversary)
    return start, DataOrder(n, seed, pos["epoch"], pos["pos"])


def _draft_model_objective(model, cfg: TrainingConfig, mode: str, loss_name: str, target_model, vocab_ids, device):
    adversary = None
    if cfg.adversarial and mode == "distill":
        from koala.adversarial import Adversary

        adversary = Adversary(cfg, device)
    return DraftModelObjective(model, mode, loss_name, target_model, adversary, vocab_ids)


def _backward(objective, data: SequenceData, micro: list[list[int]], step: int, autocast, out: Path, mode: str,
              device) -> tuple[float, int, dict]:
    """Losses and gradients of one global batch (micro-batches, this rank's share); returns (loss sum, positions,
    the objective's extra metrics), summed over DDP ranks."""
    rank, world_size = world()
    n_global = sum(len_positions(data, m) for m in micro)
    total, tokens, extra = 0.0, 0, {}
    for b in (data.batch(m[rank::world_size], device) for m in micro):
        with autocast:
            value, extra = objective.loss(b, step)
        if not torch.isfinite(value):
            last = latest_checkpoint(out)
            raise KoalaError(f"{mode} loss became {value.item()} at step {step + 1}: lower training.lr or check "
                             f"the data; the last good checkpoint is kept ({last or 'none yet'})")
        # each micro-batch's mean, weighted by its share of the global batch's positions (DDP averages ranks)
        (value * (b.n * world_size / max(n_global, 1))).backward()
        total, tokens = total + value.item() * b.n, tokens + b.n
    if world_size > 1:  # log the global batch's loss, not this rank's share
        t = torch.tensor([total, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, tokens = float(t[0]), int(t[1])
    return total, tokens, extra


def training_fingerprint(*parts) -> str:
    """A short digest of what a training is: pass its config sections, data manifest and starting weights' digest."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_digest(directory: str | Path | None) -> str | None:
    """sha256 over the safetensors files of a drafter or heads directory (None: no directory)."""
    if directory is None:
        return None
    import hashlib

    from koala.io import sha256_file

    d = Path(str(directory).removeprefix("heads:"))
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def len_positions(data: SequenceData, idx: list[int]) -> int:
    """Trained positions in these rows (the same count the batch will have), without building the batch."""
    n = 0
    for i in idx:
        r = data.rows[i]
        seq_len = min(len(r["input_ids"]), data.max_len)
        n += max(seq_len - 1 - max(r.get("prompt_len", 1) - 1, 0), 0)
    return n
