"""What a training step minimises: the objectives the one loop (koala.training.loop) runs.

* `NextToken`: pretraining an independent drafter (cross-entropy of the next token).
* `Distill`: distilling it on the target's distributions (a loss from koala.training.losses).
* `Adversarial`: KOALA's adversarial term wrapped around any of them (and around the draft heads' objectives,
  koala.training.heads_objectives).
Each also reports held-out metrics (expected acceptance, greedy agreement) as the engine would draft.
"""

from __future__ import annotations

from typing import Protocol

import torch

from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.models.vocab import over_full_vocabulary
from koala.training.data import Batch, SequenceData
from koala.training.losses import (LOSSES, Teacher, acceptance_lower_bound, cross_entropy, expected_acceptance,
                                   greedy_agreement)


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
            t = Teacher.from_topk(batch.topk_ids, batch.topk_logprobs, vocab)
            t.tokens = batch.targets
            return t, None
        t, keep = Teacher.from_topk_over(batch.topk_ids, batch.topk_logprobs, vocab_ids, vocab)
        return t, keep  # over the draft vocabulary: the data's tokens may lie outside it
    if target_model is None:
        raise KoalaError("the dataset has no stored top-k log-probs and no target was given: sample with "
                         "sampling.topk_logprobs > 0 or train with the target loaded")
    logits = target_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.positions]
    t = Teacher.from_logits(logits if vocab_ids is None else logits[:, vocab_ids])
    t.tokens = batch.targets if vocab_ids is None else None
    return t, None


class Supervised:
    """What the objectives share: the loss is the supervised term alone, nothing stateful beyond the model."""

    def supervised(self, b: Batch, logp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, the target's log-probs, the drafter's log-probs at the same positions) of one batch; the log-probs
        (N x V float32 each) only with `logp`, for the adversarial term."""
        raise NotImplementedError

    def loss(self, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        return self.supervised(b)[0], {}

    def stateful(self) -> dict:
        return {}


class NextToken(Supervised):
    """Pretraining an independent drafter: cross-entropy of the next token (Goel et al.'s stage 1)."""

    def __init__(self, lm):
        self.model = lm
        self.module = StudentAtPositions(lm)  # replaced by its DDP wrapper under torchrun

    def supervised(self, b: Batch, logp: bool = False):
        return cross_entropy(self.module(b.input_ids, b.attention_mask, b.positions), b.targets), None, None

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        return {"heldout_loss": float(self.supervised(b)[0])}


class Distill(Supervised):
    """Distillation of an independent drafter: a loss between the target's distribution p and the drafter's q.

    The teacher comes from the data's stored top-k, or from `target_model` run on the batch. With `vocab_ids` (the
    draft vocabulary, sorted ids) the drafter's head covers those tokens only and the teacher is renormalised over
    them.
    """

    def __init__(self, lm, loss_name: str, target_model=None, vocab_ids: torch.Tensor | None = None,
                 cfg: TrainingConfig | None = None):
        ids = None if vocab_ids is None else vocab_ids.to(lm.device)
        self.model = lm
        self.module = StudentAtPositions(lm, ids)  # replaced by its DDP wrapper under torchrun
        self.loss_name, self.target, self.vocab, self.vocab_ids = loss_name, target_model, lm.config.vocab_size, ids
        self.options = {}
        if loss_name == "tvdpp" and cfg is not None:
            if cfg.tvdpp_tokens == "data" and ids is not None:
                raise KoalaError("training.tvdpp_tokens=data scores the data's tokens under the full vocabulary: "
                                 "set drafter.draft_vocab to null, or training.tvdpp_tokens to drafter")
            self.options = {"samples": cfg.tvdpp_samples, "source": cfg.tvdpp_tokens}

    def supervised(self, b: Batch, logp: bool = False):
        logits = self.module(b.input_ids, b.attention_mask, b.positions)
        teacher, keep = teacher_at(b, self.target, self.vocab, self.vocab_ids)
        if keep is not None:
            logits = logits[keep]
        value = LOSSES[self.loss_name](logits, teacher, **self.options)
        return (value, teacher.logp, torch.log_softmax(logits.float(), -1)) if logp else (value, None, None)

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        """Over the full vocabulary, as the engine drafts: q is zero outside the draft vocabulary."""
        logits = self.module(b.input_ids, b.attention_mask, b.positions)
        logits = over_full_vocabulary(logits, self.vocab_ids, self.vocab)
        t, _ = teacher_at(b, self.target, self.vocab)
        m = {"heldout_expected_acceptance": float(acceptance_lower_bound(logits, t)),
             "heldout_greedy_agreement": float(greedy_agreement(logits, t))}
        if t.topk_ids is not None:  # a top-k teacher: the bound above, and the (overstating) renormalised value
            m["heldout_expected_acceptance_renormalised_topk"] = float(expected_acceptance(logits, t))
        return m


class Adversarial:
    """KOALA's adversarial term around any supervised objective: the discriminator (koala.training.adversarial)
    reads the target's and the drafter's log-probs at the positions the inner objective trains, and the drafter's
    loss adds lambda times the generator loss. The discriminator is checkpointed with the model."""

    def __init__(self, inner: Supervised, adversary):
        self.inner, self.adversary = inner, adversary

    @property
    def model(self):
        return self.inner.model

    @property
    def module(self):
        return self.inner.module

    @module.setter
    def module(self, m) -> None:  # the loop wraps it in DDP
        self.inner.module = m

    def loss(self, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        value, teacher_logp, drafter_logp = self.inner.supervised(b, logp=True)
        real, fake = self.adversary.profiles(teacher_logp, drafter_logp)
        adv, extra = self.adversary.step(real, fake, step)
        return value + adv, extra

    def metrics(self, b: Batch) -> dict:
        return self.inner.metrics(b)

    def stateful(self) -> dict:
        return {"adversary": self.adversary}


class Objective(Protocol):
    """What the training loop needs of an objective (koala.training.loop)."""

    model: torch.nn.Module  # trained and checkpointed (its parameters with requires_grad)
    module: torch.nn.Module  # what a step runs, wrapped in DDP under torchrun

    def loss(self, b: Batch, step: int) -> tuple[torch.Tensor, dict]: ...

    def metrics(self, b: Batch) -> dict: ...

    def stateful(self) -> dict: ...


def adversarial_if(objective: Supervised, cfg: TrainingConfig, device):
    """The objective wrapped in KOALA's adversarial term when `training.adversarial` says so."""
    if not cfg.adversarial:
        return objective
    from koala.training.adversarial import Adversary

    with torch.random.fork_rng(devices=[]):  # the discriminator's init depends on the seed alone, not on what ran
        torch.manual_seed(cfg.seed)
        adversary = Adversary(cfg, device)
    return Adversarial(objective, adversary)


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
