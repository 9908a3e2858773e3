"""The target's features for training draft heads: read from the shards, computed once and cached, or online.

The features f are what the target's LM head reads (its last hidden states); EAGLE-3 also reads the states at the
inputs of a few layers. Teacher-forced shards store them; otherwise they are computed with one forward per sequence,
kept in memory and written beside the data (one safetensors file per split, keyed by the target, the rows and the
sequence length), so a later training on the same data skips the target's forward passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from koala.io import digest
from koala.training.data import Batch, SequenceData


class FeatureSource:
    """(B, T, C) features for a batch of `data`'s rows: from the rows' stored features, a cache, or the target.

    It reads `data` and never changes it; a caller done with the rows' stored features may drop them (they are
    copied into this source's store). `log` hears what building the cache will cost, before it is built.
    """

    def __init__(self, target_model, data: SequenceData, cache: bool, name: str = "train",
                 cache_dir: str | Path | None = None, target_hash: str = "", aux_layers: list[int] | None = None,
                 stored_layers: list[int] | None = None, log: Callable[[str], None] | None = None):
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
            return
        if not self.cache:
            return
        tokens = sum(min(len(r["input_ids"]), data.max_len) for r in data.rows)
        if log:
            log(f"caching the target's {'states at layers ' + str(aux_layers) + ' and ' if aux_layers else ''}"
                f"features for {len(data)} {name} sequences: {tokens} tokens x {self.width} x 2 bytes "
                f"= {tokens * self.width * 2 / 1e6:.1f} MB")
        if cache_dir is None:
            return
        dev = target_model.device.type  # features computed under autocast differ from float32 ones: own cache
        dtype = str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        key = digest([target_hash, data.max_len, [r.get("prompt_id") for r in data.rows],
                      [len(r["input_ids"]) for r in data.rows]]
                     + ([dtype] if dtype else []) + ([aux_layers] if aux_layers else []))
        file = Path(cache_dir) / f"features-{name}-{key}.safetensors"
        if file.exists():
            self.store = {int(k): v for k, v in load_file(file).items()}
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
