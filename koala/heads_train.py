"""Training KOALA draft heads with koala's one training loop (`koala.train.train`), on the frozen target's features.

Supervised losses: Medusa, per-head cross-entropy against the target's distribution at the position the head
predicts (head i weighted 0.8^i); EAGLE, smooth-L1 regression of the next feature plus 0.1 x cross-entropy against
the target's next-token distribution (EAGLE's weighting). With `training.adversarial`, KOALA's discriminator term is
added (koala.adversarial, the same module the independent drafter uses).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from koala import __version__
from koala.config import HEAD_KINDS, KoalaConfig
from koala.distill import load_distillation_rows, split_heldout
from koala.drafters.heads import build_heads, load_heads, save_heads
from koala.errors import KoalaError
from koala.losses import expected_acceptance, greedy_agreement, Teacher
from koala.spec.drafters import load_draft_vocab
from koala.targets import Target
from koala.data import shards
from koala.train import Batch, LogFn, SequenceData, train, training_fingerprint, weights_digest


class FeatureSource:
    """The target's features f (what its LM head reads) for a batch: computed once per row and kept, or online.

    With `cache_dir`, the cache is also written to disk (one safetensors file per data split, keyed by the target, the
    rows and the sequence length), so later trainings on the same data (an ablation) skip the target's forward passes.
    """

    def __init__(self, target_model, data: SequenceData, cache: bool, name: str = "train",
                 cache_dir: str | Path | None = None, target_hash: str = ""):
        self.target, self.data, self.cache = target_model, data, cache
        self.store: dict[int, torch.Tensor] = {}
        C = target_model.config.hidden_size
        if data.rows and all(r.get("features") is not None for r in data.rows):  # teacher-forced shards carry them
            from koala.data.teacher import features_of

            self.cache = True
            self.store = {i: features_of(r, C, data.max_len) for i, r in enumerate(data.rows)}
            for r in data.rows:
                r.pop("features")
            return
        if not cache:
            return
        tokens = sum(min(len(r["input_ids"]), data.max_len) for r in data.rows)
        print(f"caching the target's features for {len(data)} {name} sequences: {tokens} tokens x {C} x 2 bytes "
              f"= {tokens * C * 2 / 1e6:.1f} MB")
        if cache_dir is None:
            return
        key = hashlib.sha256(json.dumps([target_hash, data.max_len, [r.get("prompt_id") for r in data.rows],
                                         [len(r["input_ids"]) for r in data.rows]]).encode()).hexdigest()[:16]
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

    @torch.no_grad()
    def _compute_all(self) -> None:
        dev = self.target.device
        for i in tqdm(range(len(self.data)), desc="target features", unit="seq", leave=False):
            ids = torch.tensor([self.data.rows[i]["input_ids"][:self.data.max_len]], device=dev)
            self.store[i] = self.target.model(input_ids=ids).last_hidden_state[0].half().cpu()

    @torch.no_grad()
    def __call__(self, b: Batch) -> torch.Tensor:
        """(B, T, C) features, zeros past each row's end."""
        if not self.cache:
            return self.target.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        missing = [i for i in b.rows if i not in self.store]
        for i in missing:
            ids = torch.tensor([self.data.rows[i]["input_ids"][:self.data.max_len]], device=b.input_ids.device)
            self.store[i] = self.target.model(input_ids=ids).last_hidden_state[0].half().cpu()
        out = torch.zeros(*b.input_ids.shape, self.target.config.hidden_size, dtype=self.target.dtype,
                          device=b.input_ids.device)
        for row, i in enumerate(b.rows):
            f = self.store[i]
            out[row, :f.shape[0]] = f.to(out.device, out.dtype)
        return out


class HeadsObjective:
    """One training step's loss for Medusa or EAGLE heads, and their held-out acceptance by draft position.

    EAGLE trains drafts 1..`unroll` (training-time test: draft i+1 reads the head's own prediction from draft i),
    each with smooth-L1 on the predicted feature plus 0.1 x cross-entropy against the target's next-token
    distribution, averaged over drafts; `noise` perturbs the true input features (a fraction of their RMS). With
    `vocab_ids` (the draft vocabulary), logits cover those tokens only, as the engine drafts, and the teacher is
    renormalised over them.
    """

    def __init__(self, kind: str, heads, target_model, features: FeatureSource, heldout_features=None,
                 adversary=None, unroll: int = 1, noise: float = 0.0, vocab_ids: torch.Tensor | None = None):
        self.kind, self.module, self.target = kind, heads, target_model
        self.features, self.heldout_features, self.adversary = features, heldout_features, adversary
        self.lm_head = target_model.lm_head
        self.unroll, self.noise = (unroll if kind == "eagle" else 1), noise
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(target_model.device)

    def _logits(self, h: torch.Tensor, subset: bool = True) -> torch.Tensor:
        if self.vocab_ids is None or not subset:
            return self.lm_head(h).float()
        return F.linear(h, self.lm_head.weight[self.vocab_ids]).float()

    def _predictions(self, b: Batch, f: torch.Tensor, train: bool = False):
        """Per draft position: (student feature (N, C), the target's feature it predicts (N, C), loss weight)."""
        pos = b.positions  # (B, T): position t predicts token t+1
        if self.kind == "medusa":
            hs = self.module(f)  # (n, B, T, C): head i on f_t predicts token t+1+i
            out = []
            for i in range(hs.shape[0]):
                shift = i + 1
                valid = pos.clone()
                valid[:, -shift:] = False
                valid[:, :-shift] &= pos[:, shift:]  # the target's distribution at t+i must be a trained position
                out.append((hs[i][valid], f[:, shift:][valid[:, :-shift]], 0.8 ** i))
            return out
        # EAGLE: slot t reads (f_t, emb(x_{t+1})) and predicts f_{t+1}; draft p's slot t reads draft p-1's f_t
        emb = self.target.model.embed_tokens(b.input_ids[:, 1:])
        f_in = f[:, :-1]
        if train and self.noise:
            rms = f_in.float().pow(2).mean().sqrt()
            f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * (self.noise * rms).to(f_in.dtype)
        slot = torch.arange(f_in.shape[1], device=f.device)
        out = []
        for p, pred in enumerate(self.module.unrolled(f_in, emb, self.unroll), 1):
            valid = pos[:, 1:] & (slot >= p - 1)[None]  # f_{t+1} at a trained position, with draft p's context
            out.append((pred[valid], f[:, 1:][valid], 0.1 / self.unroll))
        return out

    def loss(self, b: Batch, step: int):
        f = self.features(b)
        preds = self._predictions(b, f, train=True)
        logits = [(self._logits(s), self._logits(t), w) for s, t, w in preds]
        value = sum(w * -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean() for s, t, w in logits)
        if self.kind == "eagle":  # EAGLE also regresses the feature itself
            value = value + sum(F.smooth_l1_loss(s.float(), t.float()) for s, t, _ in preds) / len(preds)
        if self.adversary is None:
            return value, {}
        s, t, _ = logits[0]
        real, fake = self.adversary.profiles(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
        adv, extra = self.adversary.step(real, fake, step)
        return value + adv, extra

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        """Over the full vocabulary, as the engine drafts (q is zero outside the draft vocabulary); `_pos{p}` is the
        acceptance of draft p given drafts 1..p-1 were accepted (EAGLE with unroll > 1)."""
        preds = self._predictions(b, (self.heldout_features or self.features)(b))
        out = {}
        for p, (s, t, _) in enumerate(preds[:self.unroll], 1):
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


def train_heads(cfg: KoalaConfig, target: Target, data_dir: str | Path, out_dir: str | Path, kind: str | None = None,
                layers: int | None = None, adversarial: bool | None = None, steps: int | None = None,
                on_log: LogFn | None = None, progress: bool = True, init_from: str | Path | None = None,
                heldout_dir: str | Path | None = None, resume: bool | str = False) -> Path:
    """Train Medusa or EAGLE heads on a distillation set; returns out_dir/heads (load with `heads:PATH`).

    Args:
        data_dir: shards to train on: teacher-forced (features may be stored) or sampled.
        init_from: heads to continue from (a second stage), keeping their draft vocabulary.
        heldout_dir: measure held-out acceptance on this set's held-out prompts instead (so stages trained on
            different data are measured on the same prompts).
        resume: continue from the last checkpoint in out_dir.
    """
    kind = kind or cfg.drafter.kind
    if kind not in HEAD_KINDS:
        raise KoalaError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    tcfg = cfg.training.model_copy(update={"adversarial": cfg.training.adversarial if adversarial is None
                                           else adversarial})
    out = Path(out_dir)
    train_rows, held, manifest = _split_rows(target, data_dir, heldout_dir, tcfg.heldout_fraction)
    pad = target.tokenizer.pad_token_id or 0
    data = SequenceData(train_rows, tcfg.max_seq_len, pad)
    heldout = SequenceData(held, tcfg.max_seq_len, pad) if held else None
    for p in target.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(tcfg.seed)
    init_from = str(init_from).removeprefix("heads:") if init_from is not None else None  # as `koala heads` prints
    heads, kind, layers, vocab_ids = _start_heads(cfg, target, kind, layers, init_from, train_rows)
    adversary = None
    if tcfg.adversarial:
        from koala.adversarial import Adversary

        adversary = Adversary(tcfg, target.model.device)
    h = target.info.content_hash
    feats = FeatureSource(target.model, data, tcfg.cache_features, "train", data_dir, h)
    held_feats = (FeatureSource(target.model, heldout, tcfg.cache_features, "heldout", heldout_dir or data_dir, h)
                  if heldout else None)
    objective = HeadsObjective(kind, heads, target.model, feats, held_feats, adversary, tcfg.unroll,
                               tcfg.feature_noise, vocab_ids)
    steps = steps or tcfg.steps
    held_manifest = (shards.read_manifest(Path(heldout_dir)) or {}).get("done") if heldout_dir else None
    fp = training_fingerprint(kind, target.info.content_hash, layers, steps, tcfg.model_dump(),
                              cfg.drafter.model_dump(), manifest.get("done"), held_manifest, weights_digest(init_from))
    metrics = train(heads, data, tcfg, out, mode=f"heads-{kind}", steps=steps, heldout=heldout,
                    on_log=on_log, progress=progress, objective=objective, resume=resume, fingerprint=fp)
    n_heads = len(heads.heads) if kind == "medusa" else cfg.drafter.n_heads
    info = {"koala_version": __version__, "kind": kind, "layers": layers, "n_heads": n_heads,
            "adversarial": tcfg.adversarial, "hidden_size": target.model.config.hidden_size,
            "vocab_size": target.model.config.vocab_size,
            "target": {"name": target.info.name, "content_hash": target.info.content_hash},
            "data_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "data_dir": str(data_dir), "data_source": manifest.get("source", "generated"),
            "init_from": str(init_from) if init_from else None, "train_rows": len(train_rows),
            "train_tokens": sum(max(len(r["input_ids"]) - r.get("prompt_len", 1), 0) for r in train_rows),
            "training": tcfg.model_dump(), "metrics": metrics}
    return save_heads(heads.eval(), out / "heads", info, vocab_ids)


def _split_rows(target: Target, data_dir, heldout_dir, fraction: float) -> tuple[list, list, dict]:
    """(training rows, held-out rows, data manifest); with `heldout_dir`, the held-out prompts come from that set
    (and are kept out of training), so stages trained on different data are measured on the same prompts."""
    rows, manifest = load_distillation_rows(data_dir, target, features=True)
    train_rows, held = split_heldout(rows, fraction)
    if heldout_dir is not None and Path(heldout_dir) != Path(data_dir):
        held = split_heldout(load_distillation_rows(heldout_dir, target, features=True)[0], fraction)[1]
        ids = {r["prompt_id"] for r in held}
        train_rows = [r for r in train_rows if r["prompt_id"] not in ids]
    return train_rows, held, manifest


def _start_heads(cfg: KoalaConfig, target: Target, kind: str, layers: int | None, init_from: str | None,
                 train_rows: list[dict]):
    """(heads, kind, layers, draft vocabulary): continued from `init_from` (its kind, depth and vocabulary), or new."""
    if init_from is not None:
        heads, prior = load_heads(init_from, target.model)
        return heads.train(), prior["kind"], prior["layers"], load_draft_vocab(init_from)
    from koala.distill import draft_vocab_for

    layers = layers or cfg.drafter.layers
    return (build_heads(kind, target.model, layers, cfg.drafter.n_heads), kind, layers,
            draft_vocab_for(cfg, train_rows, target.info.vocab_size))
