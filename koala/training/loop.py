"""The one training loop: drafter pretraining, distillation and draft heads differ only in their objective.

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast where the machine runs it
faster (koala.precision: a CUDA GPU, a CPU with AMX; float32 master weights and optimizer state either way), resumable
checkpoints (koala.training.checkpoints), DDP under torchrun (gradients all-reduced once per optimizer step, not per
micro-batch). What a step minimises comes from the objective (koala.training.objectives): its `loss(batch, step)`,
its held-out `metrics(batch)`, the `model` whose trainable parameters are optimised and checkpointed, the `module`
DDP wraps, and `stateful()`, anything else a bitwise resume needs (KOALA's discriminator).
Metrics leave through `on_log(step, metrics)`; nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from koala import precision
from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.interrupt import check, fault
from koala.training.checkpoints import claim_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from koala.training.data import DataOrder, SequenceData, len_positions
from koala.training.objectives import Objective, heldout_metrics

LogFn = Callable[[int, dict], None]
LogLine = Callable[[str], None]  # a run's logger: progress lines go there when training runs unattended


def schedule(cfg: TrainingConfig, steps: int | Callable[[], int | None]):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate over `steps`: a count, or a function giving
    the count a budgeted training planned (None until it has: the peak holds until then, so the decay starts from it
    whatever the plan)."""
    total = steps if callable(steps) else (lambda: steps)

    def f(step: int) -> float:
        n = total()
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if n is None:
            return 1.0
        t = (step - cfg.warmup_steps) / max(n - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA), each process on its
    host's GPU number LOCAL_RANK (so `cuda` means that one for the target, the drafter and DDP)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def train(objective: Objective, data: SequenceData, cfg: TrainingConfig, out_dir: str | Path, steps: int, *,
          heldout: SequenceData | None = None, resume: bool | str = False, fingerprint: str | None = None,
          on_log: LogFn | None = None, progress: bool | LogLine = True, desc: str = "train",
          compute: precision.ComputeDtype | None = None) -> dict:
    """Minimise `objective` over `data` for `steps` optimizer steps; returns the last logged metrics and `steps_run`.

    Args:
        objective: what a step minimises, and the model it trains (parameters with requires_grad=False stay frozen).
        data: training sequences; each step takes batch_size * grad_accum of them (split across DDP ranks).
        cfg: the training section of the config (optimizer, schedule, batch, checkpoints, seed).
        out_dir: checkpoints go under out_dir/checkpoints.
        heldout: sequences for the held-out metrics, every cfg.eval_every steps and at the end.
        resume: True: continue this training's last checkpoint (refused if there is none, or if it is another
            training's); "auto": continue it if there is one; False: start over (see claim_checkpoints).
        fingerprint: what this training is (config, data, starting weights); checkpoints of another are not resumed.
        on_log: called with (step, metrics) every step, on rank 0.
        steps: the optimizer steps to run; under cfg.max_minutes at most this many, those that fit (`_Budget`).
        progress: a bar on the terminal (True), none (False), or a line with the bar's rate and ETA passed to this
            function (a run's logger) at most every PROGRESS_LOG_S seconds, and at the end.
        compute: the forward and loss under bf16 autocast or in float32 (koala.precision.for_model); None: bf16 on
            CUDA, float32 on a CPU. Part of the fingerprint a resume checks: bitwise resume holds within one dtype.

    Raises:
        KoalaError: the loss became NaN or infinite (the last good checkpoint is kept); a refused resume.
    """
    out = Path(out_dir)
    rank, world_size = world()
    _check_batch(cfg, world_size)
    device = next(objective.model.parameters()).device
    torch.manual_seed(cfg.seed)
    budget = _Budget(cfg.max_minutes, out, steps, cfg.checkpoint_every)  # the steps it runs (the decay's too)
    params, opt, sched = _optimizer(objective, cfg, budget.total, world_size)
    start, order = _starting_point(out, resume, fingerprint, objective, opt, sched, len(data), cfg.seed)
    budget.begin(start, progress if rank == 0 else False)
    compute = compute or precision.ComputeDtype("bfloat16" if device.type == "cuda" else "float32", "the loop's default")
    autocast = compute.autocast(device)
    metrics: dict = {}
    with _bar(start, budget.steps, desc, progress if rank == 0 else False) as bar:
        for step in range(start, steps):
            if step >= budget.steps:  # fewer under a budget
                break
            check()  # SIGINT/SIGTERM: stop between optimizer steps (the last checkpoint is kept)
            metrics = _step(objective, data, cfg, order.take, step, autocast, out, device, desc, opt, sched, params)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == budget.steps:
                metrics.update(heldout_metrics(objective, heldout, device))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == budget.steps) and rank == 0:
                save_checkpoint(out, step + 1, objective.model, opt, sched, order.state(), objective.stateful())
                fault("train.checkpoint")
            if budget.due(step + 1):  # after the step's checkpoint: a resume from it runs the plan made here
                bar.total = budget.plan(step + 1)
            if on_log and rank == 0:
                on_log(step + 1, metrics)
            bar.update(1)
    if start >= budget.steps:  # resumed a finished training: its held-out metrics again, not nothing
        metrics = heldout_metrics(objective, heldout, device)
    if world_size > 1:  # no rank goes on to save the result before rank 0 has written the last checkpoint
        dist.barrier()
    return {**metrics, "steps_run": budget.steps}


def _check_batch(cfg: TrainingConfig, world_size: int) -> None:
    if cfg.batch_size < world_size:  # a rank would get an empty micro-batch
        raise KoalaError(f"training.batch_size {cfg.batch_size} is smaller than the {world_size} DDP ranks: raise it "
                         f"to at least {world_size} (ranks split each micro-batch)")


def _step(objective: Objective, data: SequenceData, cfg: TrainingConfig, take, step: int, autocast, out: Path, device,
          desc: str, opt, sched, params) -> dict:
    """One optimizer step over the next global batch (`take` hands out each micro-batch's sequences); its metrics."""
    t0 = time.perf_counter()
    micro = [take(cfg.batch_size) for _ in range(cfg.grad_accum)]  # the global batch of this step
    loss_sum, tokens, extra = _backward(objective, data, micro, step, autocast, out, device, desc)
    grad_norm = _optimizer_step(opt, sched, params, cfg.grad_clip)
    fault("train.step")
    return {"loss": loss_sum / max(tokens, 1), "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / (time.perf_counter() - t0), **extra}


PROGRESS_LOG_S = 20.0  # seconds between progress lines written to a log


class _LogLines:
    """A file for tqdm that hands each of its refreshed lines, whole, to a log function."""

    def __init__(self, log: LogLine):
        self.log = log

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.log(line)

    def flush(self) -> None:
        pass


def _bar(start: int, steps: int, desc: str, progress: bool | LogLine):
    """A bar over the steps to run, with the progress `train` was asked for (see its `progress`)."""
    if callable(progress):
        return tqdm(initial=start, total=steps, desc=desc, unit="step", file=_LogLines(progress),
                    mininterval=PROGRESS_LOG_S, miniters=1, position=0, ascii=True, ncols=100)
    return tqdm(initial=start, total=steps, desc=desc, unit="step", disable=not progress)


PLAN_TIMED = 6  # steps a budgeted training times (after its first two) before it plans
PLAN_FILE = "plan.json"  # beside the checkpoints: the steps a budgeted training planned


class _Budget:
    """The steps a training runs: `steps`, or under training.max_minutes those that fit. The first PLAN_TIMED steps
    after two (compilation, warm caches) are timed, and the training then runs the steps that fit in the minutes left
    (at least one more), its schedule's decay planned over them (the learning rate holds at its peak until then).
    After each checkpoint from the second after the plan on (every `every` steps) it plans again, at the rate of the
    steps since the checkpoint before, held-out evaluations and checkpoints included, and cuts the steps to those
    that still fit: neither they nor a step rate that slows run the training past its minutes (the schedule's decay
    follows the new count). The first checkpoint after the plan only starts that timing, so one-off costs (a first
    evaluation's compilation) are not charged to every step left. A plan never grows: the decay never turns back up.
    The plan is written beside the checkpoints (PLAN_FILE), so a training resumed from a later checkpoint runs the
    same steps under the same schedule."""

    def __init__(self, minutes: float | None, out: Path, steps: int, every: int | None = None):
        self.seconds = minutes * 60 if minutes else None
        self.path, self.asked, self.every = out / "checkpoints" / PLAN_FILE, steps, every
        self.planned: int | None = None
        self.start, self.progress, self.t0 = 0, False, 0.0  # set by begin()
        self.mark: tuple[int, float] | None = None  # (step, time) the current timing began at, set by due()

    @property
    def steps(self) -> int:
        return self.planned or self.asked

    def total(self) -> int | None:
        """The steps the schedule decays over: None while a budgeted training has yet to plan."""
        return None if self.seconds and self.planned is None else self.steps

    def begin(self, start: int, progress: bool | LogLine) -> None:
        """The training starts at `start`: a resumed one (start > 0) runs the plan stored beside its checkpoints, if
        it made one; from step 0 it times and plans afresh. Under DDP every rank runs rank 0's plan."""
        self.start, self.progress, self.t0 = start, progress, time.perf_counter()
        if not self.seconds:
            return
        self.planned = self._stored() if start > 0 and world()[0] == 0 else None
        if world()[1] > 1:
            box = [self.planned]
            dist.broadcast_object_list(box, src=0)
            self.planned = box[0]

    def _stored(self) -> int | None:
        import json

        try:
            plan = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return int(plan["planned"]) if plan.get("steps") == self.asked else None

    def due(self, done: int) -> bool:
        """Whether the training plans after its `done`-th step (timing the steps before it), or plans again: at a
        checkpoint, in a process that timed its own steps (a resumed training runs its stored plan)."""
        if not self.seconds:
            return False
        if self.planned is None:
            if done == self.start + 2:
                self.mark = (done, time.perf_counter())
            return done == self.start + 2 + PLAN_TIMED and done < self.asked
        if self.mark is None or not self.every or done % self.every or done >= self.planned:
            return False
        if self.mark[0] <= self.start + 2 + PLAN_TIMED:  # the first checkpoint after the plan starts the timing
            self.mark = (done, time.perf_counter())
            return False
        return True

    def plan(self, done: int) -> int:
        """The steps that fit in the minutes left at the rate of the steps timed since the mark: the PLAN_TIMED steps
        at first, the steps since the last checkpoint (with their evaluations and checkpoint) after; a later plan
        only cuts (rank 0's, under DDP)."""
        from koala.io import write_json_atomic

        now = time.perf_counter()
        rate = (now - self.mark[1]) / (done - self.mark[0])
        self.mark = (done, now)
        fit = done + int((self.seconds - (now - self.t0)) / rate)
        again = self.planned is not None
        planned = max(done + 1, min(self.planned if again else self.asked, fit))
        rank, world_size = world()
        if world_size > 1:
            box = [planned]
            dist.broadcast_object_list(box, src=0)
            planned = box[0]
        changed, self.planned = planned != self.planned, planned
        if rank == 0 and changed:
            write_json_atomic(self.path, {"steps": self.asked, "planned": planned, "s_per_step": rate,
                                          "max_minutes": self.seconds / 60})
            line = (f"training.max_minutes {self.seconds / 60:g}: "
                    + (f"at step {done}, {rate:.2f} s/step with evaluations and checkpoints" if again else
                       f"{rate:.2f} s/step") + f", {planned} of {self.asked} steps fit"
                    + ("" if planned < self.asked else " (all of them)"))
            if callable(self.progress):
                self.progress(line)
            elif self.progress:
                tqdm.write(line)
        return planned


def _optimizer(objective: Objective, cfg: TrainingConfig, steps: Callable[[], int], world_size: int):
    """The trainable parameters, AdamW and the schedule (the objective's module wrapped in DDP under torchrun)."""
    if world_size > 1:
        objective.module = torch.nn.parallel.DistributedDataParallel(objective.module)
    params = [p for p in objective.model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)  # one kernel for all params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused or None)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg, steps))


def _optimizer_step(opt, sched, params, clip: float) -> torch.Tensor:
    """Clip the global gradient norm, step the optimizer and the schedule; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _starting_point(out: Path, resume: bool | str, fingerprint: str | None, objective: Objective, opt, sched, n: int,
                    seed: int) -> tuple[int, DataOrder]:
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
    start, pos = load_checkpoint(ckpt, objective.model, opt, sched, objective.stateful())
    return start, DataOrder(n, seed, pos["epoch"], pos["pos"])


def _backward(objective: Objective, data: SequenceData, micro: list[list[int]], step: int, autocast, out: Path,
              device, desc: str) -> tuple[float, int, dict]:
    """Losses and gradients of one global batch (micro-batches, this rank's share); returns (loss sum, positions,
    the objective's extra metrics), summed over DDP ranks. Gradients are all-reduced once, on the last micro-batch."""
    rank, world_size = world()
    n_global = sum(len_positions(data, m) for m in micro)
    total, tokens, extra = 0.0, 0, {}
    for i, m in enumerate(micro):
        b = data.batch(m[rank::world_size], device)
        last_micro = i == len(micro) - 1 or not hasattr(objective.module, "no_sync")
        # DDP decides at the forward whether the backward all-reduces: both run under no_sync but the last one's
        with nullcontext() if last_micro else objective.module.no_sync():
            with autocast:
                value, extra = objective.loss(b, step)
            finite = torch.isfinite(value.detach()).to(torch.int32)
            if world_size > 1:  # every rank stops, not one while the others wait for it in the backward
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                last = latest_checkpoint(out)
                raise KoalaError(f"{desc} loss became {value.item() if world_size == 1 else 'non-finite'} at step "
                                 f"{step + 1}: lower training.lr or check the data; the last good checkpoint is kept "
                                 f"({last or 'none yet'})")
            # each micro-batch's mean, weighted by its share of the global batch's positions (DDP averages ranks)
            (value * (b.n * world_size / max(n_global, 1))).backward()
        total, tokens = total + value.item() * b.n, tokens + b.n
    if world_size > 1:  # log the global batch's loss, not this rank's share
        t = torch.tensor([total, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, tokens = float(t[0]), int(t[1])
    return total, tokens, extra
