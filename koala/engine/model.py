"""A lean decoder-only transformer with a static KV cache written by position (after gpt-fast's `model.py`).

It runs the weights of a Hugging Face Llama-family model (Llama, SmolLM, Mistral without sliding window, Qwen2) as
shared tensors, not copies, so the engine, training and Hugging Face `generate` all see one set of parameters.
Writing the cache by position means a rejected draft costs nothing to undo: the next step writes over it, and the
causal mask built from `input_pos` hides whatever lies beyond the current position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from koala.engine.kv_cache import SLOT_ROUND, KVCache
from koala.errors import KoalaError

SUPPORTED = {"llama", "mistral", "qwen2", "smollm3"}
# The fewest slots a compiled model's cache has where its steps attend to the slots below their end (ahead-of-time
# steps on a CPU): a step's cost does not grow with the cache, and a package is built per cache size, so one size
# covers the prompts and answers of every benchmark an evaluation runs (about 48 MB of float32 cache for the
# default target). A batched sampler's steps attend to the whole cache: they keep the smaller floor.
SLICED_MIN_SLOTS = 1024


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, computed in float32 as Hugging Face does (one fused op)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos, sin: (B, 1, T, D) -- the "rotate half" layout of Hugging Face checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Transformer(nn.Module):
    """Forward over a Hugging Face causal LM's modules with koala's own static caches.

    The HF model keeps owning the parameters; this module only references them, so a drafter built on
    the first N layers (`truncated(n)`) shares weights and memory with the target but has its own caches.
    """

    def __init__(self, hf_model: nn.Module, n_layers: int | None = None):
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED:
            raise KoalaError(
                f"model type {cfg.model_type!r} is not supported by koala's engine (supported: "
                f"{', '.join(sorted(SUPPORTED))}): use a Llama-family target"
            )
        inner = hf_model.model
        total = len(inner.layers)
        n = total if n_layers is None else n_layers
        if not 1 <= n <= total:
            raise KoalaError(f"truncate:N needs 1 <= N <= {total} (the target's layers), got {n}")
        self.hf_model = [hf_model]  # a list, so the HF model is not registered twice as a submodule
        self.embed = inner.embed_tokens
        self.layers = inner.layers[:n]
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        rot = inner.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(getattr(rot, "attention_scaling", 1.0))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.args = ModelArgs(
            vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=n, n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, norm_eps=cfg.rms_norm_eps,
        )
        self.caches = nn.ModuleList()
        self.max_seq_len = 0
        self.compiled = None  # set by compile(): the forward compiled once per step width
        self.features_before_norm = False  # EAGLE-3's decoder: its features are the residual stream before the norm

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def truncated(self, n_layers: int) -> "Transformer":
        """The first n_layers with the same embeddings, final norm and head: the `truncate:N` baseline drafter."""
        return Transformer(self.hf_model[0], n_layers)

    def setup_caches(self, max_seq_len: int, batch: int = 1) -> None:
        """Allocate static caches for `max_seq_len` slots (size it max_len + gamma + 1 for speculation).

        Caches only grow. A compiled model rounds the size up to a power of two (at least 512; SLICED_MIN_SLOTS for
        one sequence whose steps attend to the slots below their end, so a step costs the same in a larger cache),
        so that a run over prompts of many lengths, and the several benchmarks of one evaluation, compile each step
        once, not once per length.
        """
        a = self.args
        if self.compiled is not None:
            floor = SLICED_MIN_SLOTS if self.compiled.sliced and batch == 1 else 512  # a batch attends to it all
            max_seq_len = max(floor, 1 << (max_seq_len - 1).bit_length())
        if self.max_seq_len >= max_seq_len and self.caches and self.caches[0].k.shape[0] == batch:
            return
        # SLOT_ROUND slots past max_seq_len that attention never reads: a step's slot count is then always below the
        # cache's length, so cutting the cache to it is a real slice, never the no-op torch.export would specialise on
        self.caches = nn.ModuleList(
            KVCache(batch, a.n_kv_heads, max_seq_len + SLOT_ROUND, a.head_dim, self.dtype, self.device)
            for _ in range(a.n_layers)
        )
        self.max_seq_len = max_seq_len

    def compile(self, mode: str | None = None) -> "Transformer":
        """Compile the decode steps (see `koala.engine.compile`): later `step` calls of a few tokens run compiled."""
        from koala.engine.compile import AotStep, CompiledStep, aot_enabled

        aot = aot_enabled(self.device, mode)
        self.compiled = AotStep(self, mode) if aot else CompiledStep(self.forward, self.device, mode)
        self.max_seq_len, self.caches = 0, nn.ModuleList()  # re-allocated at the compiled size on next use
        return self

    def step(self, idx: torch.Tensor | None, input_pos: torch.Tensor, end: int, *, embeds: torch.Tensor | None = None,
             rows: torch.Tensor | None = None, hidden: bool | tuple[int, ...] = False, logits: bool = True, eager: bool = False,
             tree: tuple[torch.Tensor, torch.Tensor] | None = None,
             last_logits: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The engine's one entry to a forward of tokens at cache slots `input_pos`, all below slot `end` (a host int);
        returns (logits or None, features or None) as `forward` does; `last_logits`: the last position's logits only
        (B, 1, V), a prefill's, from which the first new token is drawn (an eager forward runs the LM head on that
        position alone; a compiled step computes every position's and keeps the last).

        The one place that decides how a step attends. Eager on a CPU it attends to slots [0, end) only (fewer bytes
        read); eager on CUDA, and compiled anywhere, to the whole static cache (fixed shapes: one graph per width, no
        recompilation as the sequence grows). A compiled model runs steps of at most `MAX_STEP_WIDTH` tokens compiled
        unless `eager` (a prefill, or a feed whose width varies from call to call: each new width would be a new
        compilation) or `rows` (a batched sampler's prefill into some of its rows, eager only).

        `tree` (positions (T,), visible (T, max_seq_len) bool): a draft tree's nodes, each at its own rotary position
        and attending to the slots it sees (koala.engine.tree). A compiled model runs every step of 2 or more tokens
        of one sequence this way (a chain is the tree whose nodes each see the ones before), so chains and trees of
        every width share one compiled graph. Steps compiled ahead of time run one-token steps this way too, with the
        mask cut to the slots below `end` (rounded up to SLOT_ROUND): attention then reads the sequence's slots, not
        the whole cache (at 300 tokens of context in a 1024-slot cache, a bf16 step of 4 tokens costs a quarter less).
        """
        from koala.engine.compile import MAX_STEP_WIDTH

        T = (idx if embeds is None else embeds).shape[1]
        if self.compiled is not None and not eager and rows is None and T <= MAX_STEP_WIDTH:
            # ahead-of-time steps attend to the slots below `end` only (rounded up: the slot count is a symbolic
            # dimension of the package); graph-captured ones to the whole cache
            S = min(self.max_seq_len, -(-end // SLOT_ROUND) * SLOT_ROUND) if self.compiled.sliced else self.max_seq_len
            if tree is None and (T > 1 or self.compiled.sliced) and input_pos.dim() == 1:
                tree = (input_pos, torch.arange(S, device=input_pos.device) <= input_pos[:, None])
            elif tree is not None:
                tree = (tree[0], tree[1][:, :S])
            lg, h = self.compiled(idx, input_pos, embeds=embeds, hidden=hidden, logits=logits, tree=tree)
            return (lg[:, -1:] if last_logits and lg is not None else lg), h
        kv_len = None if self.device.type == "cuda" and rows is None else end  # a prefill into rows: eager anywhere
        return self.forward(idx, input_pos, rows=rows, kv_len=kv_len, embeds=embeds, hidden=hidden, logits=logits,
                            tree=tree, last_logits=last_logits)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's cached keys and values from slots `src` to slots `dst` (an accepted tree path moved
        where a chain would have written it; every src >= its dst, read before any is written)."""
        for c in self.caches:
            c.k[:, :, dst] = c.k[:, :, src]
            c.v[:, :, dst] = c.v[:, :, src]

    def _rope(self, pos: torch.Tensor):
        # pos: (B, T) positions -> cos, sin: (B, 1, T, D)
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(self.dtype)[:, None]
        sin = (emb.sin() * self.attention_scaling).to(self.dtype)[:, None]
        return cos, sin

    def _positions_and_mask(self, input_pos, tree, B: int, T: int, S: int):
        """Rotary positions (B, T) and the additive attention mask (B, 1, T, S) of a step.

        Always masked: slots past a query's position hold rejected drafts or an earlier prompt's leftovers, even for
        a single query (a drafter's step sits below the last slot it will write this round). A tree's nodes have
        their own positions and see the slots `tree` says. Additive, built once per forward, not in every layer.
        """
        pos = input_pos[None, :].expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        if tree is None:
            seen = (torch.arange(S, device=pos.device) <= pos[..., None])[:, None]  # slots up to the query's
        else:
            pos, seen = tree[0][None, :].expand(B, T), tree[1][None, None, :, :S].expand(B, 1, T, S)
        return pos, torch.zeros(seen.shape, dtype=self.dtype, device=pos.device).masked_fill_(~seen, float("-inf"))

    def _attention(self, layer, i, x, cos, sin, input_pos, mask, kv_len, rows, caches):
        a, attn = self.args, layer.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = caches[i].update(input_pos, k, v, rows)  # (B, H_kv, slots, D): every slot, masked below
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))

    def forward(
        self,
        idx: torch.Tensor | None,
        input_pos: torch.Tensor,
        rows: torch.Tensor | None = None,
        kv_len: int | None = None,
        embeds: torch.Tensor | None = None,
        hidden: bool | tuple[int, ...] = False,
        logits: bool = True,
        tree: tuple[torch.Tensor, torch.Tensor] | None = None,
        caches: list | None = None, last_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V) float32 or None, features (B, T, C) or None) for tokens `idx` (B, T) written at cache
        slots `input_pos`. Call it through `step`, which decides `kv_len`.

        `input_pos` is (T,), one sequence's slots for every row, or (B, T), each row its own sequence at its own
        slots (a batched sampler: row b's rotary positions are its slots, its cache row holds only its sequence).
        `rows` (B,): the cache rows the batch's rows use (a prefill into some rows of a batched cache); None: rows
        0..B-1. `embeds` (B, T, C) replace the token embeddings (EAGLE feeds its fused features); (B, T, 2C) are
        EAGLE-3's [token embeddings ; state], of which the first layer attends over both, normed apart (its
        `hidden_norm`), and the state is the residual stream. `hidden`: also return the features the LM head reads
        (after the final norm), which draft heads read, or with a tuple of layer indices the residual stream at the
        input of each (index n_layers: before the final norm), concatenated (EAGLE-3's fused states); `logits=False` skips
        the LM head (a drafter with its own subset head). `kv_len` (a host int > every input_pos) limits attention
        to the first kv_len slots: faster on a CPU, but a shape change, so None where steps are captured as graphs.
        `tree` (rotary positions (T,), visible slots (T, S) bool) replaces the causal mask (see `step`). `caches`
        (one `CacheView` per layer) stand in for the model's own: an ahead-of-time compiled step takes the caches as
        inputs it writes in place (koala.engine.compile). `last_logits`: logits (B, 1, V) of the last position only.
        """
        if self.max_seq_len == 0:  # an int, not the ModuleList's truth value: dynamo traces this without a break
            raise KoalaError("call setup_caches() before the first forward")
        x = self.embed(idx) if embeds is None else embeds  # embeds (B, T, C): EAGLE feeds its fused features
        e = None
        if x.shape[-1] != self.args.dim:  # EAGLE-3: [token embeddings ; state]
            e, x = x.split(self.args.dim, dim=-1)
        B, T = x.shape[:2]
        if kv_len is None:  # the slots the mask covers: the whole cache, or (a tree's mask) those below the step's end
            kv_len = self.max_seq_len if tree is None else tree[1].shape[-1]
        S = kv_len
        pos, mask = self._positions_and_mask(input_pos, tree, B, T, S)
        cos, sin = self._rope(pos)
        eps = self.args.norm_eps
        aux = {}
        for i, layer in enumerate(self.layers):
            if isinstance(hidden, tuple) and i in hidden:
                aux[i] = x
            h = rms_norm(x, layer.input_layernorm.weight, eps)
            if e is not None and i == 0:
                h = torch.cat([rms_norm(e, layer.input_layernorm.weight, eps), rms_norm(x, layer.hidden_norm.weight, eps)],
                              dim=-1)
            x = x + self._attention(layer, i, h, cos, sin, input_pos, mask, kv_len, rows, caches or self.caches)
            x = x + layer.mlp(rms_norm(x, layer.post_attention_layernorm.weight, eps))
        if isinstance(hidden, tuple):
            aux[len(self.layers)] = x  # index n_layers: the input of the final norm
        h = rms_norm(x, self.norm.weight, eps)  # (B, T, C) the features the LM head reads
        out = self.lm_head(h[:, -1:] if last_logits else h).float() if logits else None
        if isinstance(hidden, tuple):
            return out, torch.cat([aux[i] for i in hidden], dim=-1)
        return out, ((x if self.features_before_norm else h) if hidden or not logits else None)
