"""The draft vocabulary (FR-Spec, Zhao et al. 2025): the K most frequent response tokens, saved beside a drafter as
`draft_vocab.safetensors` (sorted token ids). Training restricts the drafter's head to it; the engine drafts over it
(koala.engine.drafters.DraftVocab)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError

DRAFT_VOCAB = "draft_vocab.safetensors"


def draft_vocab_ids(token_counts: torch.Tensor, k: int) -> torch.Tensor:
    """The k most frequent tokens (counts (V,)), sorted: the drafter's vocabulary."""
    return token_counts.topk(min(k, int((token_counts > 0).sum()) or k)).indices.sort().values


def save_draft_vocab(directory, ids: torch.Tensor) -> None:
    save_file({"ids": ids.contiguous()}, str(Path(directory) / DRAFT_VOCAB))


def load_draft_vocab(directory) -> torch.Tensor | None:
    """The draft vocabulary saved beside a drafter (sorted token ids), or None: it drafts over the full vocabulary."""
    d = Path(str(directory).removeprefix("heads:"))
    f = d / DRAFT_VOCAB
    if f.exists():
        try:
            return load_file(f)["ids"].long()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise KoalaError(f"{f} is damaged ({e}): copy the drafter again or retrain it") from None
    for name in ("koala.json", "heads.json"):  # saved with a draft vocabulary, but the file is gone
        info = json.loads((d / name).read_text()) if (d / name).exists() else {}
        if info.get("draft_vocab_size"):
            raise KoalaError(f"{d} lacks {DRAFT_VOCAB} (its {name} says it drafts over {info['draft_vocab_size']} "
                             "tokens): copy the whole drafter directory again")
    return None


def over_full_vocabulary(logits: torch.Tensor, vocab_ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(N, K) logits over the draft vocabulary as (N, vocab) ones, -1e4 (probability 0) outside it: what the engine
    drafts from. Full-vocabulary logits (`vocab_ids` None) are returned as they are."""
    if vocab_ids is None:
        return logits
    return logits.new_full((logits.shape[0], vocab), -1e4).index_copy_(-1, vocab_ids, logits)
