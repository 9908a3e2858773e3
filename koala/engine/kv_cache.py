"""The static KV cache written by position (gpt-fast's `KVCache`), and a view of given tensors as one layer's cache.

Writing by position means a rejected draft costs nothing to undo: the next step writes over it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# A compiled step attends to the slots below its end rounded up to a multiple of this; a model's caches hold this
# many slots more than it attends to at most (koala.engine.model.Transformer.setup_caches).
SLOT_ROUND = 16


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        """Write k, v (B, H_kv, T, D) at slots input_pos: (T,) for every row, or (B, T) each row its own slots (a
        batch of independent sequences), into cache rows `rows` (B,) (None: rows 0..B-1). Returns the rows' caches.
        Under autocast (a sampler in bf16) k and v come in the compute dtype and are stored in the cache's."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if input_pos.dim() == 1 and rows is None:
            # index_put_, not index_copy_: a compiled step writes the T slots in place (inductor re-inplaces it),
            # where index_copy_ became a pass over the whole cache of every layer
            self.k[:, :, input_pos] = k
            self.v[:, :, input_pos] = v
            return self.k, self.v
        B, T = k.shape[0], k.shape[2]
        r = (torch.arange(B, device=k.device) if rows is None else rows)[:, None]  # (B, 1)
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        self.k[r, :, pos] = k.transpose(1, 2)  # advanced indices around a slice: the values are (B, T, H_kv, D)
        self.v[r, :, pos] = v.transpose(1, 2)
        if rows is None:
            return self.k, self.v
        return self.k[rows], self.v[rows]


class CacheView:
    """A layer's cache as two given tensors (k, v), written in place as `KVCache` writes its own buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    update = KVCache.update
