"""What a training step minimises: the objectives the one loop (koala.training.loop) runs.

* `NextToken`: pretraining an independent drafter (cross-entropy of the next token).
* `Distill`: distilling it on the target's distributions (a loss from koala.training.losses).
* `HeadsObjective`: Medusa or EAGLE heads on the frozen target's features (`FeatureSource`).
* `Adversarial`: KOALA's adversarial term wrapped around any of them.
Each also reports held-out metrics (expected acceptance, greedy agreement) as the engine would draft.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.training.chunked_ce import linear_soft_cross_entropy
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


class _Supervised:
    """What the objectives share: the loss is the supervised term alone, nothing stateful beyond the model."""

    def supervised(self, b: Batch, logp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, the target's log-probs, the drafter's log-probs at the same positions) of one batch; the log-probs
        (N x V float32 each) only with `logp`, for the adversarial term."""
        raise NotImplementedError

    def loss(self, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        return self.supervised(b)[0], {}

    def stateful(self) -> dict:
        return {}


class NextToken(_Supervised):
    """Pretraining an independent drafter: cross-entropy of the next token (Goel et al.'s stage 1)."""

    def __init__(self, lm):
        self.model = lm
        self.module = StudentAtPositions(lm)  # replaced by its DDP wrapper under torchrun

    def supervised(self, b: Batch, logp: bool = False):
        return cross_entropy(self.module(b.input_ids, b.attention_mask, b.positions), b.targets), None, None

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        return {"heldout_loss": float(self.supervised(b)[0])}


class Distill(_Supervised):
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
        if self.vocab_ids is not None:
            full = logits.new_full((logits.shape[0], self.vocab), -1e4)
            logits = full.index_copy_(-1, self.vocab_ids, logits)
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

    def __init__(self, inner: _Supervised, adversary):
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


def adversarial_if(objective: _Supervised, cfg: TrainingConfig, device):
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


class FeatureSource:
    """The target's features f (what its LM head reads) for a batch: computed once per row and kept, or online.

    With `cache_dir`, the cache is also written to disk (one safetensors file per data split, keyed by the target, the
    rows and the sequence length), so later trainings on the same data (an ablation) skip the target's forward passes.
    """

    def __init__(self, target_model, data: SequenceData, cache: bool, name: str = "train",
                 cache_dir: str | Path | None = None, target_hash: str = "", aux_layers: list[int] | None = None,
                 stored_layers: list[int] | None = None):
        self.target, self.data, self.cache = target_model, data, cache
        self.aux = aux_layers  # EAGLE-3: the states at these layers' inputs, then the features (A C + C per token)
        self.store: dict[int, torch.Tensor] = {}
        C = target_model.config.hidden_size
        self.width = C * (len(aux_layers) + 1) if aux_layers else C
        from koala.data.teacher import features_of, stored_width

        stored = data.rows and all(r.get("features") is not None for r in data.rows)
        # teacher-forced shards carry the features, and the states of `stored_layers` before them where set
        usable = stored and (not aux_layers or (list(aux_layers) == list(stored_layers or [])
                                                and all(stored_width(r) == self.width for r in data.rows)))
        if usable:
            self.cache = True
            self.store = {i: features_of(r, C, data.max_len, self.width) for i, r in enumerate(data.rows)}
        for r in data.rows if stored else ():
            r.pop("features")  # kept in the store, or (EAGLE-3 over other layers) computed below instead
        if usable or not self.cache:
            return
        tokens = sum(min(len(r["input_ids"]), data.max_len) for r in data.rows)
        print(f"caching the target's {'states at layers ' + str(aux_layers) + ' and ' if aux_layers else ''}features "
              f"for {len(data)} {name} sequences: {tokens} tokens x {self.width} x 2 bytes "
              f"= {tokens * self.width * 2 / 1e6:.1f} MB")
        if cache_dir is None:
            return
        dev = target_model.device.type  # features computed under autocast differ from float32 ones: own cache
        dtype = str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        key = hashlib.sha256(json.dumps([target_hash, data.max_len, [r.get("prompt_id") for r in data.rows],
                                         [len(r["input_ids"]) for r in data.rows]]
                                        + ([dtype] if dtype else []) + ([aux_layers] if aux_layers else [])
                                        ).encode()).hexdigest()[:16]
        file = Path(cache_dir) / f"features-{name}-{key}.safetensors"
        if file.exists():
            loaded = load_file(file)
            self.store = {int(k): v for k, v in loaded.items()}
            return
        self._compute_all()
        from koala.io import atomic_path

        try:
            with atomic_path(file) as tmp:
                save_file({str(k): v.contiguous() for k, v in self.store.items()}, str(tmp))
        except OSError:
            pass  # a read-only data directory: keep the features in memory only

    def _forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if self.aux:
            from koala.models.heads import aux_states

            return aux_states(self.target, input_ids, attention_mask, self.aux)
        return self.target.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def _compute_all(self) -> None:
        dev = self.target.device
        for i in tqdm(range(len(self.data)), desc="target features", unit="seq", leave=False):
            ids = torch.tensor([self.data.rows[i]["input_ids"][:self.data.max_len]], device=dev)
            self.store[i] = self._forward(ids)[0].half().cpu()

    @torch.no_grad()
    def __call__(self, b: Batch) -> torch.Tensor:
        """(B, T, C) features (EAGLE-3: (B, T, A C + C), the states then the features), zeros past each row's end."""
        if not self.cache:
            return self._forward(b.input_ids, b.attention_mask)
        missing = [i for i in b.rows if i not in self.store]
        for i in missing:
            ids = torch.tensor([self.data.rows[i]["input_ids"][:self.data.max_len]], device=b.input_ids.device)
            self.store[i] = self._forward(ids)[0].half().cpu()
        out = torch.zeros(*b.input_ids.shape, self.width, dtype=self.target.dtype, device=b.input_ids.device)
        for row, i in enumerate(b.rows):
            f = self.store[i]
            out[row, :f.shape[0]] = f.to(out.device, out.dtype)
        return out


class HeadsObjective(_Supervised):
    """One training step's loss for Medusa, EAGLE or EAGLE-3 heads, and their held-out acceptance by draft position.

    EAGLE trains drafts 1..`unroll` (training-time test: draft i+1 reads the head's own prediction from draft i),
    each with smooth-L1 on the predicted feature plus 0.1 x cross-entropy against the target's next-token
    distribution, averaged over drafts; `noise` perturbs the true input features (a fraction of their RMS). EAGLE-3
    trains the same drafts on cross-entropy alone, draft p weighted 0.8^(p-1), and leaves out the positions where the
    target's top token is outside the draft vocabulary (no draft could match it there). With `vocab_ids` (the draft
    vocabulary), logits cover those tokens only, as the engine drafts, and the teacher is renormalised over them.
    """

    def __init__(self, kind: str, heads, target_model, features: FeatureSource, heldout_features=None,
                 unroll: int = 1, noise: float = 0.0, vocab_ids: torch.Tensor | None = None):
        self.kind, self.model, self.module, self.target = kind, heads, heads, target_model
        self.features, self.heldout_features = features, heldout_features
        self.lm_head = target_model.lm_head
        self.unroll, self.noise = (unroll if kind in ("eagle", "eagle3") else 1), noise
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(target_model.device)
        self._inside: dict[tuple[int, int], torch.Tensor] = {}  # EAGLE-3: (source, row) -> top token in the vocabulary
        self._in_vocab = None  # (V,) bool: the draft vocabulary's tokens
        if self.vocab_ids is not None:
            self._in_vocab = torch.zeros(self.lm_head.weight.shape[0], dtype=torch.bool, device=self.vocab_ids.device)
            self._in_vocab[self.vocab_ids] = True
        for src in (features, heldout_features):
            if src is not None and getattr(src, "aux", None) != getattr(heads, "aux_layers", None):
                raise KoalaError(f"the feature source reads layers {getattr(src, 'aux', None)}, the {kind} heads "
                                 f"{getattr(heads, 'aux_layers', None)}: build it with aux_layers=heads.aux_layers")
        # the frozen head over the draft vocabulary, gathered once (K, C), and its autocast copy (cast once, not at
        # every call: autocast caches casts of trainable weights only)
        w = self.lm_head.weight.detach()
        self.head_weight = w if self.vocab_ids is None else w[self.vocab_ids]
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def _weight(self, subset: bool) -> torch.Tensor:
        w = self.head_weight if subset else self.lm_head.weight.detach()
        dev = w.device.type
        if not torch.is_autocast_enabled(dev):
            return w
        dt = torch.get_autocast_dtype(dev)
        if subset:
            if dt not in self._cast:
                self._cast[dt] = w.to(dt)
            return self._cast[dt]
        return w.to(dt)

    def _logits(self, h: torch.Tensor, subset: bool = True) -> torch.Tensor:
        """(N, K) float32 logits over the draft vocabulary (`subset`) or (N, V) over the full one."""
        return F.linear(h, self._weight(subset or self.vocab_ids is None)).float()

    def _predictions(self, b: Batch, f: torch.Tensor, train: bool = False, source=None):
        """Per draft position: (student feature (N, C), the target's feature it predicts (N, C), loss weight, rows
        of the first draft's targets these are (EAGLE: each draft's targets are a subset of draft 1's) or None)."""
        pos = b.positions  # (B, T): position t predicts token t+1
        if self.kind == "medusa":
            hs = self.module(f)  # (n, B, T, C): head i on f_t predicts token t+1+i
            out = []
            for i in range(hs.shape[0]):
                shift = i + 1
                valid = pos.clone()
                valid[:, -shift:] = False
                valid[:, :-shift] &= pos[:, shift:]  # the target's distribution at t+i must be a trained position
                out.append((hs[i][valid], f[:, shift:][valid[:, :-shift]], 0.8 ** i, None))
            return out
        # EAGLE: slot t reads (f_t, emb(x_{t+1})) and predicts f_{t+1}; draft p's slot t reads draft p-1's f_t.
        # EAGLE-3: f holds the target's states at its fused layers (read at slot t), then its features (predicted).
        C = self.target.config.hidden_size
        A = f.shape[-1] - C if self.kind == "eagle3" else C
        emb = self.target.model.embed_tokens(b.input_ids[:, 1:])
        f_in, f_out = f[:, :-1, :A], f[:, 1:, -C:]
        if train and self.noise:
            rms = f_in.float().pow(2).mean().sqrt()
            f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * (self.noise * rms).to(f_in.dtype)
        slot = torch.arange(f_in.shape[1], device=f.device)
        first = pos[:, 1:]  # draft 1's trained slots
        if self.kind == "eagle3" and train and self.vocab_ids is not None:
            first = first & self._top_inside(b, f_out, source)
        out = []
        for p, pred in enumerate(self.module(f_in, emb, unroll=self.unroll), 1):
            valid = first & (slot >= p - 1)[None]  # f_{t+1} at a trained position, with draft p's context
            rows = None if p == 1 else (slot >= p - 1)[None].expand_as(first)[first]  # (N1,) bool
            w = 0.8 ** (p - 1) if self.kind == "eagle3" else 0.1 / self.unroll
            out.append((pred[valid], f_out[valid], w, rows))
        return out

    @torch.no_grad()
    def _top_inside(self, b: Batch, f_out: torch.Tensor, source) -> torch.Tensor:
        """(B, T-1) bool: the target's top token at each slot's predicted position lies in the draft vocabulary;
        computed once per row of a cached feature source (a GEMM over the full vocabulary), every batch otherwise."""
        out = torch.zeros(f_out.shape[:2], dtype=torch.bool, device=f_out.device)
        keep = getattr(source, "cache", False)
        w = self._weight(False)
        for row, i in enumerate(b.rows or range(f_out.shape[0])):
            m = self._inside.get((id(source), i)) if keep else None
            if m is None:  # over the row's trained slots only (the others are never in the loss)
                n = max(int(b.attention_mask[row].sum()) - 1, 0)  # the row's slots (rows are right-padded)
                trained = b.positions[row, 1:n + 1]
                m = torch.ones(n, dtype=torch.bool, device=f_out.device)
                if trained.any():
                    m[trained] = self._in_vocab[torch.cat([F.linear(c, w).argmax(-1)
                                                           for c in f_out[row, :n][trained].split(512)])]
                if keep:
                    self._inside[(id(source), i)] = m
            out[row, :m.shape[0]] = m
        return out

    def supervised(self, b: Batch, logp: bool = False):
        """The heads' loss; the log-probs are every draft position's (all Medusa heads, all unrolled EAGLE drafts),
        stacked, so the adversarial term reaches every head."""
        preds = self._predictions(b, self.features(b), train=True, source=self.features)
        value = self._cross_entropy(preds) if not logp else 0.0
        if self.kind == "eagle":  # EAGLE also regresses the feature itself
            value = value + sum(F.smooth_l1_loss(s.float(), t.float()) for s, t, _, _ in preds) / len(preds)
        if not logp:
            return value, None, None
        # with the adversarial term: the (N, K) log-probs themselves, so the loss is written plainly
        teachers, first = [], None
        with torch.no_grad():  # the frozen target's distribution: once per position (EAGLE's drafts share draft 1's)
            for s, t, w, rows in preds:
                if rows is None:
                    first = torch.log_softmax(self._logits(t), -1)
                teachers.append(first if rows is None else first[rows])
        logits = [torch.log_softmax(self._logits(s), -1) for s, _, _, _ in preds]
        value = value + sum(w * -(t.exp() * q).sum(-1).mean() for q, t, (_, _, w, _) in zip(logits, teachers, preds))
        return value, torch.cat(teachers), torch.cat(logits)

    def _cross_entropy(self, preds) -> torch.Tensor:
        """sum over drafts of w_p x mean soft cross-entropy against the target, every draft in one chunked pass
        (koala.training.chunked_ce); EAGLE's later drafts are taught by rows of draft 1's targets."""
        if self.kind in ("eagle", "eagle3"):
            teacher = preds[0][1]
            rows = torch.cat([torch.arange(teacher.shape[0], device=teacher.device) if r is None else r.nonzero()[:, 0]
                              for _, _, _, r in preds])
        else:  # Medusa: each head its own targets, in the same order
            teacher = torch.cat([t for _, t, _, _ in preds])
            rows = torch.arange(teacher.shape[0], device=teacher.device)
        weights = torch.cat([torch.full((s.shape[0],), w / max(s.shape[0], 1), device=s.device)
                             for s, _, w, _ in preds])
        return linear_soft_cross_entropy(torch.cat([s for s, _, _, _ in preds]), teacher, rows, weights,
                                         self._weight(True))

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        """Over the full vocabulary, as the engine drafts (q is zero outside the draft vocabulary); `_pos{p}` is the
        acceptance of draft p given drafts 1..p-1 were accepted (EAGLE with unroll > 1)."""
        preds = self._predictions(b, (self.heldout_features or self.features)(b))
        out = {}
        for p, (s, t, _, _) in enumerate(preds[:self.unroll], 1):
            logits = self._logits(s)
            if self.vocab_ids is not None:
                logits = logits.new_full((logits.shape[0], self.lm_head.weight.shape[0]), -1e4).index_copy_(
                    -1, self.vocab_ids, logits)
            teacher = Teacher.from_logits(self._logits(t, subset=False))
            m = {"heldout_expected_acceptance": float(expected_acceptance(logits, teacher)),
                 "heldout_greedy_agreement": float(greedy_agreement(logits, teacher))}
            if p == 1:
                out.update(m)
            if self.unroll > 1:
                out.update({f"{k}_pos{p}": v for k, v in m.items()})
        return out
