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
from koala.config import KoalaConfig
from koala.distill import load_distillation_rows, split_heldout
from koala.drafters.heads import build_heads, save_heads
from koala.errors import KoalaError
from koala.losses import expected_acceptance, greedy_agreement, Teacher
from koala.targets import Target
from koala.train import Batch, LogFn, SequenceData, train


class FeatureSource:
    """The target's features f (what its LM head reads) for a batch: computed once per row and kept, or online.

    With `cache_dir`, the cache is also written to disk (one safetensors file per data split, keyed by the target, the
    rows and the sequence length), so later trainings on the same data (an ablation) skip the target's forward passes.
    """

    def __init__(self, target_model, data: SequenceData, cache: bool, name: str = "train",
                 cache_dir: str | Path | None = None, target_hash: str = ""):
        self.target, self.data, self.cache = target_model, data, cache
        self.store: dict[int, torch.Tensor] = {}
        if not cache:
            return
        C = target_model.config.hidden_size
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
    """One training step's loss for Medusa or EAGLE heads (and the held-out acceptance of head 1 / EAGLE)."""

    def __init__(self, kind: str, heads, target_model, features: FeatureSource, heldout_features=None,
                 adversary=None):
        self.kind, self.module, self.target = kind, heads, target_model
        self.features, self.heldout_features, self.adversary = features, heldout_features, adversary
        self.lm_head = target_model.lm_head

    def _predictions(self, b: Batch, f: torch.Tensor):
        """(list of (student logits (N, V), teacher logits (N, V), weight), student feats, target feats)."""
        pos = b.positions  # (B, T): position t predicts token t+1
        if self.kind == "medusa":
            hs = self.module(f)  # (n, B, T, C): head i on f_t predicts token t+1+i
            out = []
            for i in range(hs.shape[0]):
                shift = i + 1
                valid = pos.clone()
                valid[:, -shift:] = False
                valid[:, :-shift] &= pos[:, shift:]  # the target's distribution at t+i must be a trained position
                teacher = self.lm_head(f[:, shift:][valid[:, :-shift]]).float()
                out.append((self.lm_head(hs[i][valid]).float(), teacher, 0.8 ** i))
            return out, hs[0][pos], f[pos]
        # EAGLE: slot t reads (f_t, emb(x_{t+1})) and predicts f_{t+1}
        emb = self.target.model.embed_tokens(b.input_ids[:, 1:])
        pred = self.module(f[:, :-1], emb, attention_mask=b.attention_mask[:, 1:])  # (B, T-1, C)
        valid = pos[:, 1:]  # f_{t+1} at a trained position
        f_next = f[:, 1:][valid]
        return [(self.lm_head(pred[valid]).float(), self.lm_head(f_next).float(), 0.1)], pred[valid], f_next

    def loss(self, b: Batch, step: int):
        f = self.features(b)
        preds, fake_feats, real_feats = self._predictions(b, f)
        value = sum(w * -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean() for s, t, w in preds)
        if self.kind == "eagle":
            value = value + F.smooth_l1_loss(fake_feats.float(), real_feats.float())
        if self.adversary is None:
            return value, {}
        s, t, _ = preds[0]
        real, fake = self.adversary.profiles(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
        adv, extra = self.adversary.step(real, fake, step)
        return value + adv, extra

    @torch.no_grad()
    def metrics(self, b: Batch) -> dict:
        preds, _, _ = self._predictions(b, (self.heldout_features or self.features)(b))
        s, t, _ = preds[0]
        teacher = Teacher.from_logits(t)
        return {"heldout_expected_acceptance": float(expected_acceptance(s, teacher)),
                "heldout_greedy_agreement": float(greedy_agreement(s, teacher))}


def train_heads(cfg: KoalaConfig, target: Target, data_dir: str | Path, out_dir: str | Path, kind: str | None = None,
                layers: int | None = None, adversarial: bool | None = None, steps: int | None = None,
                on_log: LogFn | None = None, progress: bool = True) -> Path:
    """Train Medusa or EAGLE heads on the distillation set; returns out_dir/heads (load with `heads:PATH`)."""
    kind = kind or cfg.drafter.kind
    if kind not in ("medusa", "eagle"):
        raise KoalaError(f"head kind must be medusa or eagle, got {kind!r}")
    layers = layers or cfg.drafter.layers
    tcfg = cfg.training.model_copy(update={"adversarial": cfg.training.adversarial if adversarial is None
                                           else adversarial})
    out = Path(out_dir)
    rows, manifest = load_distillation_rows(data_dir, target)
    train_rows, held = split_heldout(rows, tcfg.heldout_fraction)
    pad = target.tokenizer.pad_token_id or 0
    data = SequenceData(train_rows, tcfg.max_seq_len, pad)
    heldout = SequenceData(held, tcfg.max_seq_len, pad) if held else None
    for p in target.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(tcfg.seed)
    heads = build_heads(kind, target.model, layers, cfg.drafter.n_heads)
    adversary = None
    if tcfg.adversarial:
        from koala.adversarial import Adversary

        adversary = Adversary(tcfg, target.model.device)
    h = target.info.content_hash
    feats = FeatureSource(target.model, data, tcfg.cache_features, "train", data_dir, h)
    held_feats = FeatureSource(target.model, heldout, tcfg.cache_features, "heldout", data_dir, h) if heldout else None
    objective = HeadsObjective(kind, heads, target.model, feats, held_feats, adversary)
    metrics = train(heads, data, tcfg, out, mode=f"heads-{kind}", steps=steps or tcfg.steps, heldout=heldout,
                    on_log=on_log, progress=progress, objective=objective)
    info = {"koala_version": __version__, "kind": kind, "layers": layers, "n_heads": cfg.drafter.n_heads,
            "adversarial": tcfg.adversarial, "hidden_size": target.model.config.hidden_size,
            "vocab_size": target.model.config.vocab_size,
            "target": {"name": target.info.name, "content_hash": target.info.content_hash},
            "data_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "training": tcfg.model_dump(), "metrics": metrics}
    path = save_heads(heads.eval(), out / "heads", info)
    from koala.distill import draft_vocab_for, write_draft_vocab

    write_draft_vocab(path, draft_vocab_for(cfg, train_rows, target.info.vocab_size))
    return path
