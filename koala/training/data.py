"""The data every training recipe shares: rows of token ids (a distillation set's shards, or pretraining text), split
into training and held-out prompts, batched with the positions trained on and the teacher's stored top-k.

`training_data` is the one data setup of `pretrain`, `distill` and `train_heads` (koala.training.recipes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from koala.config import KoalaConfig
from koala.data import prompts as P
from koala.data import shards
from koala.errors import KoalaError
from koala.targets import Target, encode_chat


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

    def drop(self, column: str) -> None:
        """Forget one column of every row (a large one whose contents were copied elsewhere)."""
        for r in self.rows:
            r.pop(column, None)

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


def len_positions(data: SequenceData, idx: list[int]) -> int:
    """Trained positions in these rows (the same count the batch will have), without building the batch."""
    n = 0
    for i in idx:
        r = data.rows[i]
        seq_len = min(len(r["input_ids"]), data.max_len)
        n += max(seq_len - 1 - max(r.get("prompt_len", 1) - 1, 0), 0)
    return n


def split_heldout(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts (by a hash of prompt_id), so no held-out prompt is trained on."""
    if fraction <= 0 or len(rows) < 4:
        return rows, []
    held = [r for r in rows if int(hashlib.sha256(r["prompt_id"].encode()).hexdigest()[:8], 16) / 16**8 < fraction]
    if not held:
        held = rows[-1:]
    ids = {r["prompt_id"] for r in held}
    return [r for r in rows if r["prompt_id"] not in ids], held


def load_distillation_rows(data_dir: str | Path, target: Target, features: bool = False) -> tuple[list[dict], shards.DatasetManifest]:
    """The shards' rows after checking they were made by this target and tokenizer.

    With `features` (draft heads), the target's stored features where the shards have them, instead of its top-k
    (heads read the teacher off the features).
    """
    cols = ["prompt_id", "input_ids", "prompt_len"] + (["features"] if features else ["topk_ids", "topk_logprobs"])
    table = shards.load(data_dir, columns=cols)
    meta = shards.read_manifest(Path(data_dir)) or shards.DatasetManifest()
    t = meta.target
    if t.get("tokenizer_hash") != target.info.tokenizer_hash or t.get("content_hash") != target.info.content_hash:
        raise KoalaError(
            f"{data_dir} was sampled from target {t.get('name')} ({str(t.get('content_hash'))[:12]}...), not from "
            f"{target.info.name} ({target.info.content_hash[:12]}...): sample the data with this target"
        )
    return table.to_pylist(), meta


def response_token_counts(rows: list[dict], vocab: int) -> torch.Tensor:
    """How often each token appears in the responses: what a draft vocabulary keeps."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for r in rows:
        ids = torch.tensor(r["input_ids"][r["prompt_len"]:], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab)[:vocab]
    return counts


def draft_vocab_for(cfg: KoalaConfig, rows: list[dict], vocab: int) -> torch.Tensor | None:
    """The drafter's vocabulary (drafter.draft_vocab most frequent response tokens), or None for the full one."""
    if not cfg.drafter.draft_vocab:
        return None
    from koala.models.vocab import draft_vocab_ids

    return draft_vocab_ids(response_token_counts(rows, vocab), cfg.drafter.draft_vocab)


def pretraining_rows(cfg: KoalaConfig, target: Target, limit: int = 2000) -> list[dict]:
    """Text for next-token pretraining: whole ShareGPT conversations in the chat template, or a file's `text`."""
    src = cfg.training.pretrain_corpus
    tok = target.tokenizer
    rows = []
    if src == "sharegpt":
        for r in P.sharegpt(turns=1_000):
            rows.append({"prompt_id": r.id, "prompt_len": 1,
                         "input_ids": encode_chat(tok, list(r.messages), add_generation_prompt=False)})
            if len(rows) >= limit:
                break
    else:
        for r in P.load(src, limit=limit, prompt_col="text", category_col=None):
            rows.append({"prompt_id": r.id, "prompt_len": 1, "input_ids": tok(r.messages[0]["content"])["input_ids"]})
    return rows


@dataclass
class TrainingData:
    train: SequenceData
    heldout: SequenceData | None
    manifest: shards.DatasetManifest  # the distillation set's manifest (empty for pretraining text)


def training_data(cfg: KoalaConfig, target: Target, data_dir: str | Path | None = None, *, features: bool = False,
                  heldout_dir: str | Path | None = None, online_teacher: bool = False) -> TrainingData:
    """The training and held-out sequences of a recipe.

    Args:
        data_dir: a distillation set (checked to come from this target); None: pretraining text.
        features: draft heads: the target's stored features where the shards have them, instead of its top-k.
        heldout_dir: hold out this set's held-out prompts instead (kept out of training too), so stages trained on
            different data are measured on the same prompts.
        online_teacher: drop the stored top-k: the target is run on every batch instead.
    """
    if data_dir is None:
        rows, manifest = pretraining_rows(cfg, target), shards.DatasetManifest()
    else:
        rows, manifest = load_distillation_rows(data_dir, target, features=features)
    if online_teacher:
        for r in rows:
            r.pop("topk_ids", None), r.pop("topk_logprobs", None)
    fraction = cfg.training.heldout_fraction
    train_rows, held = split_heldout(rows, fraction)
    if heldout_dir is not None and data_dir is not None and Path(heldout_dir) != Path(data_dir):
        held = split_heldout(load_distillation_rows(heldout_dir, target, features=features)[0], fraction)[1]
        ids = {r["prompt_id"] for r in held}
        train_rows = [r for r in train_rows if r["prompt_id"] not in ids]
    pad, n = target.tokenizer.pad_token_id or 0, cfg.training.max_seq_len
    return TrainingData(SequenceData(train_rows, n, pad), SequenceData(held, n, pad) if held else None, manifest)
