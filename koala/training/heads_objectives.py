"""What training draft heads minimises: Medusa's heads and EAGLE's (EAGLE-1 and EAGLE-3) on the frozen target.

* `MedusaObjective` (Cai et al. 2024): head i on the features f_t predicts token t+1+i; head i's cross-entropy
  against the target's distribution weighted `medusa_decay`^i (the paper's 0.8).
* `EagleObjective` (Li et al. 2024, EAGLE-1; 2025, EAGLE-3): slot t reads (f_t, the embedding of token t+1) and
  predicts f_{t+1}; drafts 1..`unroll` are trained as the engine drafts them (training-time test: draft p reads the
  head's own prediction from draft p-1). EAGLE-1: smooth-L1 on the predicted feature, averaged over drafts, plus
  `eagle_ce_weight` (the paper's 0.1) times the cross-entropy, shared by the drafts. EAGLE-3: cross-entropy alone,
  draft p weighted `eagle3_decay`^(p-1) (the reference training's 0.8), leaving out the positions where the target's
  top token lies outside the draft vocabulary (no draft could match it there).

With `vocab_ids` (the draft vocabulary) the heads' logits cover those tokens only, as the engine drafts, and the
teacher is renormalised over them. Both report the held-out acceptance by draft position over the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from koala.config import TrainingConfig
from koala.errors import KoalaError
from koala.models.vocab import over_full_vocabulary
from koala.training.chunked_ce import linear_soft_cross_entropy, teacher_probs
from koala.training.data import Batch
from koala.training.features import FeatureSource
from koala.training.losses import Teacher, expected_acceptance, greedy_agreement
from koala.training.objectives import Supervised

# One draft position's training pairs: (student feature (N, C), the target's feature it predicts (N, C), the loss
# weight, the rows of draft 1's targets these are (EAGLE: each draft's targets are a subset of draft 1's) or None).
Prediction = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]
MEASURED_DRAFTS = 3  # an EAGLE head's held-out metrics cover at least this many draft positions


class HeadsObjective(Supervised):
    """What Medusa's and EAGLE's objectives share: the frozen LM head over the draft vocabulary, the soft
    cross-entropy over every draft position in one pass, the adversarial log-probs, and the held-out metrics."""

    def __init__(self, heads, target_model, features: FeatureSource, heldout_features: FeatureSource | None = None,
                 unroll: int = 1, vocab_ids: torch.Tensor | None = None):
        self.model, self.module, self.target = heads, heads, target_model
        self.features, self.heldout_features = features, heldout_features
        self.lm_head = target_model.lm_head
        self.unroll = unroll
        self.teacher_temperature = 1.0  # softmax(logits / T) of the target's: heads_objective sets the config's
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(target_model.device)
        for src in (features, heldout_features):
            if src is not None and getattr(src, "aux", None) != getattr(heads, "aux_layers", None):
                raise KoalaError(f"the feature source reads layers {getattr(src, 'aux', None)}, the heads "
                                 f"{getattr(heads, 'aux_layers', None)}: build it with aux_layers=heads.aux_layers")
        # the frozen head over the draft vocabulary, gathered once (K, C), and its autocast copy (cast once, not at
        # every call: autocast caches casts of trainable weights only)
        w = self.lm_head.weight.detach()
        self.head_weight = w if self.vocab_ids is None else w[self.vocab_ids]
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def _predictions(self, b: Batch, f: torch.Tensor, train: bool = False, source=None,
                     unroll: int | None = None) -> list[Prediction]:
        """Each draft position's training pairs; EAGLE unrolls `unroll` drafts (default: the trained depth)."""
        raise NotImplementedError

    def _regression(self, preds: list[Prediction]) -> torch.Tensor | float:
        """A loss on the predicted features themselves (EAGLE-1's); none by default."""
        return 0.0

    def _teacher_rows(self, preds: list[Prediction]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the target's features (M, C), for each student row the index of its teacher among them)."""
        teacher = torch.cat([t for _, t, _, _ in preds])  # each draft position its own targets, in the same order
        return teacher, torch.arange(teacher.shape[0], device=teacher.device)

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

    def supervised(self, b: Batch, logp: bool = False):
        """The heads' loss; the log-probs are every draft position's (all Medusa heads, all unrolled EAGLE drafts),
        stacked, so the adversarial term reaches every head."""
        preds = self._predictions(b, self.features(b), train=True, source=self.features)
        value = (self._cross_entropy(preds) if not logp else 0.0) + self._regression(preds)
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
        taught = [t.exp() if self.teacher_temperature == 1 else teacher_probs(t, self.teacher_temperature)
                  for t in teachers]  # the cross-entropy's teacher; the adversary reads the target's own
        value = value + sum(w * -(t * q).sum(-1).mean() for q, t, (_, _, w, _) in zip(logits, taught, preds))
        return value, torch.cat(teachers), torch.cat(logits)

    def _cross_entropy(self, preds: list[Prediction]) -> torch.Tensor:
        """sum over drafts of w_p x mean soft cross-entropy against the target, every draft in one chunked pass
        (koala.training.chunked_ce)."""
        teacher, rows = self._teacher_rows(preds)
        weights = torch.cat([torch.full((s.shape[0],), w / max(s.shape[0], 1), device=s.device)
                             for s, _, w, _ in preds])
        return linear_soft_cross_entropy(torch.cat([s for s, _, _, _ in preds]), teacher, rows, weights,
                                         self._weight(True), self.teacher_temperature)

    def measured_drafts(self) -> int:
        """How many draft positions the held-out metrics measure."""
        return self.unroll

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        """Over the full vocabulary, as the engine drafts (q is zero outside the draft vocabulary); `_pos{p}` is the
        acceptance of draft p given drafts 1..p-1 were accepted (EAGLE: `measured_drafts()` deep)."""
        depth = self.measured_drafts()
        preds = self._predictions(b, (self.heldout_features or self.features)(b), unroll=depth)
        out = {}
        for p, (s, t, _, _) in enumerate(preds[:depth], 1):
            logits = over_full_vocabulary(self._logits(s), self.vocab_ids, self.lm_head.weight.shape[0])
            teacher = Teacher.from_logits(self._logits(t, subset=False))
            m = {"heldout_expected_acceptance": float(expected_acceptance(logits, teacher)),
                 "heldout_greedy_agreement": float(greedy_agreement(logits, teacher))}
            if p == 1:
                out.update(m)
            if depth > 1:
                out.update({f"{k}_pos{p}": v for k, v in m.items()})
        return out


class MedusaObjective(HeadsObjective):
    """Medusa's heads: head i on f_t predicts token t+1+i, its loss weighted `decay`^i."""

    def __init__(self, heads, target_model, features: FeatureSource, heldout_features: FeatureSource | None = None,
                 vocab_ids: torch.Tensor | None = None, decay: float = 0.8):
        super().__init__(heads, target_model, features, heldout_features, 1, vocab_ids)
        self.decay = decay

    def _predictions(self, b: Batch, f: torch.Tensor, train: bool = False, source=None,
                     unroll: int | None = None) -> list[Prediction]:
        pos = b.positions  # (B, T): position t predicts token t+1
        hs = self.module(f)  # (n, B, T, C): head i on f_t predicts token t+1+i
        out = []
        for i in range(hs.shape[0]):
            shift = i + 1
            valid = pos.clone()
            valid[:, -shift:] = False
            valid[:, :-shift] &= pos[:, shift:]  # the target's distribution at t+i must be a trained position
            out.append((hs[i][valid], f[:, shift:][valid[:, :-shift]], self.decay ** i, None))
        return out


class EagleObjective(HeadsObjective):
    """EAGLE-1 or EAGLE-3 heads, drafts 1..unroll trained as they draft (see the module's docstring)."""

    def __init__(self, kind: str, heads, target_model, features: FeatureSource,
                 heldout_features: FeatureSource | None = None, unroll: int = 1, noise: float = 0.0,
                 vocab_ids: torch.Tensor | None = None, ce_weight: float = 0.1, decay: float = 0.8):
        super().__init__(heads, target_model, features, heldout_features, unroll, vocab_ids)
        self.eagle3, self.noise, self.ce_weight, self.decay = kind == "eagle3", noise, ce_weight, decay
        self._inside: dict[tuple[int, int], torch.Tensor] = {}  # EAGLE-3: (source, row) -> top token in the vocabulary
        self._in_vocab = None  # (V,) bool: the draft vocabulary's tokens
        if self.vocab_ids is not None:
            self._in_vocab = torch.zeros(self.lm_head.weight.shape[0], dtype=torch.bool, device=self.vocab_ids.device)
            self._in_vocab[self.vocab_ids] = True

    def _predictions(self, b: Batch, f: torch.Tensor, train: bool = False, source=None,
                     unroll: int | None = None) -> list[Prediction]:
        # slot t reads (f_t, emb(x_{t+1})) and predicts f_{t+1}; draft p's slot t reads draft p-1's f_t. EAGLE-3: f
        # holds the target's states at its fused layers (read at slot t), then its features (predicted).
        pos = b.positions  # (B, T): position t predicts token t+1
        C = self.target.config.hidden_size
        A = f.shape[-1] - C if self.eagle3 else C
        emb = self.target.model.embed_tokens(b.input_ids[:, 1:])
        f_in, f_out = f[:, :-1, :A], f[:, 1:, -C:]
        if train and self.noise:
            rms = f_in.float().pow(2).mean().sqrt()
            f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * (self.noise * rms).to(f_in.dtype)
        slot = torch.arange(f_in.shape[1], device=f.device)
        first = pos[:, 1:]  # draft 1's trained slots
        if self.eagle3 and train and self.vocab_ids is not None:
            first = first & self._top_inside(b, f_out, source)
        out = []
        for p, pred in enumerate(self.module(f_in, emb, unroll=unroll or self.unroll), 1):
            valid = first & (slot >= p - 1)[None]  # f_{t+1} at a trained position, with draft p's context
            rows = None if p == 1 else (slot >= p - 1)[None].expand_as(first)[first]  # (N1,) bool
            w = self.decay ** (p - 1) if self.eagle3 else self.ce_weight / self.unroll
            out.append((pred[valid], f_out[valid], w, rows))
        return out

    def measured_drafts(self) -> int:
        """At least MEASURED_DRAFTS: a head trained one draft deep drafts deeper all the same, and its stored
        acceptance by position is what `gamma: auto` reads (koala.engine.calibrate.stored_acceptance)."""
        return max(self.unroll, MEASURED_DRAFTS)

    def _regression(self, preds: list[Prediction]) -> torch.Tensor | float:
        if self.eagle3:  # EAGLE-3 drops the feature regression: its fused input is not the feature it predicts
            return 0.0
        return sum(F.smooth_l1_loss(s.float(), t.float()) for s, t, _, _ in preds) / len(preds)

    def _teacher_rows(self, preds: list[Prediction]) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = preds[0][1]  # later drafts are taught by rows of draft 1's targets
        rows = torch.cat([torch.arange(teacher.shape[0], device=teacher.device) if r is None else r.nonzero()[:, 0]
                          for _, _, _, r in preds])
        return teacher, rows

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


def heads_objective(kind: str, heads, target_model, features: FeatureSource,
                    heldout_features: FeatureSource | None = None, unroll: int = 1, noise: float = 0.0,
                    vocab_ids: torch.Tensor | None = None, cfg: TrainingConfig | None = None) -> HeadsObjective:
    """The objective of `kind` (medusa, eagle, eagle3) heads, its loss weights from `cfg` (the papers' by default)."""
    cfg = cfg or TrainingConfig()
    if kind == "medusa":
        objective = MedusaObjective(heads, target_model, features, heldout_features, vocab_ids, cfg.medusa_decay)
    elif kind in ("eagle", "eagle3"):
        objective = EagleObjective(kind, heads, target_model, features, heldout_features, unroll, noise, vocab_ids,
                                   cfg.eagle_ce_weight, cfg.eagle3_decay)
    else:
        raise KoalaError(f"unknown heads kind {kind!r}: medusa, eagle or eagle3")
    objective.teacher_temperature = cfg.teacher_temperature
    return objective
