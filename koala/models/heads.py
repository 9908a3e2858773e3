"""KOALA draft heads (Zhang, Zhao, Chen 2024): K-layer Medusa and EAGLE heads on the target's features.

* Medusa (Cai et al. 2024): n non-autoregressive heads on the target's feature f_t (what its LM head reads); head i
  is K residual blocks x + SiLU(W x) followed by the target's frozen LM head and predicts token t+1+i.
* EAGLE (Li et al. 2024): one autoregressive feature-level head: fc([f_t ; emb(x_{t+1})]) -> K decoder layers of the
  target's architecture -> the predicted feature f_{t+1}, read by the target's LM head; drafting feeds it its own
  predicted features gamma times.
* EAGLE-3 (Li et al. 2025): the same autoregressive head on the target's hidden states from three depths (the inputs
  of layers 2, L//2 and L-3 by default, as vLLM's speculators and SpecForge read them), concatenated and projected to
  C by a bias-free linear layer; its first decoder layer attends over [norm(emb(x_{t+1})) ; norm(state)] (2C) with
  the state as its residual stream; its output, before the final norm, is the next draft step's state. Trained on
  cross-entropy alone (no feature regression) over the draft vocabulary, drafts 1..unroll on its own states.
K = 1 is the original head; KOALA makes it K deep. The target stays frozen; only the heads are trained and saved
(`heads.safetensors` + `heads.json`), and `--drafter heads:PATH` loads them onto the target in the engine
(koala.engine.drafters.MedusaDrafter, EagleDrafter).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError

HEADS_JSON, HEADS_WEIGHTS = "heads.json", "heads.safetensors"


class ResBlock(nn.Module):
    """x + SiLU(W x), W zero-initialised so a new head starts as the identity (Medusa's choice)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """n heads of K ResBlocks: (..., C) features -> (n, ..., C) per-head features for the target's LM head."""

    def __init__(self, hidden: int, n_heads: int, layers: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden) for _ in range(layers)]) for _ in range(n_heads))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(f) for h in self.heads])


class EagleHead(nn.Module):
    """fc([f_t ; norm(emb(x_{t+1}))]) then K decoder layers (the target's architecture) -> predicted f_{t+1}.

    The RMS norm on the token embedding (`embed_norm`, speculators' `embedding_layernorm`) puts the embedding on the
    feature's scale; with it, a K = 1 head is exactly the `eagle` speculator of vLLM's speculators package with
    `layernorms` and `fusion_bias` (koala.export.speculators). Heads saved before it existed load without it.
    """

    def __init__(self, target_config, layers: int, embed_norm: bool = True):
        super().__init__()
        from transformers import LlamaModel
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.config = _llama_config(target_config, layers)
        C = self.config.hidden_size
        self.fc = nn.Linear(2 * C, C)
        _feature_passthrough(self.fc, C)
        self.decoder = LlamaModel(self.config)
        # its one-row token table is never read (inputs are embeddings), so it never has a gradient: DDP must not
        # wait for one (left trainable, not frozen, so optimizer states of earlier checkpoints still fit)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, ["decoder.embed_tokens.weight"])
        self.embed_norm = LlamaRMSNorm(C, eps=self.config.rms_norm_eps) if embed_norm else None

    def fuse(self, feats: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        if self.embed_norm is not None:
            next_embeds = self.embed_norm(next_embeds)
        return self.fc(torch.cat([feats, next_embeds], dim=-1))

    def forward(self, feats: torch.Tensor, next_embeds: torch.Tensor, attention_mask=None,
                unroll: int | None = None):
        """Teacher-forced training pass: (B, T, C) features and next-token embeddings -> (B, T, C) predictions.

        With `unroll`, the training-time test's drafts 1..unroll instead (`unrolled`, a list), run as this module's
        forward so that a DDP wrapper sees it."""
        if unroll is not None:
            return self.unrolled(feats, next_embeds, unroll)
        x = self.fuse(feats, next_embeds)
        return self.decoder(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state

    def unrolled(self, feats: torch.Tensor, next_embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test (EAGLE-3): the predictions of drafts 1..steps at every slot, each (B, T, C).

        Slot j of draft 1 reads (f_j, emb x_{j+1}) and predicts f_{j+1}, as `forward`. Slot j of draft p > 1 reads
        (draft p-1's prediction at slot j-1, emb x_{j+1}) and attends to what drafting's p-th step sees: draft 1's
        slots up to j-p+1 (true features) and draft q's slot j-p+q for q = 2..p (the head's own predictions).
        Draft p's slots j < p-1 have no such context and must be left out of the loss. Rows are right-padded:
        padding is never attended by a slot before it.
        """
        dec = self.decoder
        T = feats.shape[1]
        pos = torch.arange(T, device=feats.device)
        cos, sin = dec.rotary_emb(feats, pos[None])
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in dec.layers]  # per layer: (K, V) per draft
        outs, prev = [], feats
        for p in range(1, steps + 1):
            x = self.fuse(prev if p == 1 else _shift(prev, 1), next_embeds)
            for layer, kv in zip(dec.layers, past):
                x = x + _unrolled_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, kv, pos)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            prev = dec.norm(x)
            outs.append(prev)
        return outs


FC_INIT_SCALE = 0.1  # what is left of the fc layer's random initialisation beside the identity on the feature


@torch.no_grad()
def _feature_passthrough(fc: nn.Linear, C: int) -> None:
    """Start fc([f_t ; emb]) as f_t plus a tenth of its random weights (the bias as drawn): a new head's first
    residual stream is the target's own feature, which the decoder layer learns to move one token on, instead of a
    random mix of feature and embedding it must first learn to undo. A short training reaches a higher held-out
    agreement from it (`bench/head_init.py`, both starts on the same data and seeds: bench/results/head_init.json)."""
    fc.weight.mul_(FC_INIT_SCALE)
    fc.weight[:, :C] += torch.eye(C, dtype=fc.weight.dtype, device=fc.weight.device)


def reference_aux_layers(n_layers: int) -> list[int]:
    """EAGLE-3's fused target layers as vLLM's speculators and SpecForge choose them: the inputs of layers 2, L//2 and
    L-3 (input of layer L: the last layer's output before the final norm); evenly spread for targets too shallow."""
    ids = [2, n_layers // 2, n_layers - 3]
    if len(set(ids)) != 3 or min(ids) < 0 or max(ids) > n_layers:
        ids = sorted({round(i * n_layers / 4) for i in (1, 2, 3)})
    return ids


def check_aux_layers(layers: list[int], n_layers: int) -> list[int]:
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) > n_layers:
        raise KoalaError(f"drafter.aux_layers {layers} must be distinct target layers in 0..{n_layers} (the input of "
                         f"that layer; {n_layers}: the last layer's output): e.g. {reference_aux_layers(n_layers)}")
    return list(layers)


@torch.no_grad()
def aux_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: list[int]
               ) -> torch.Tensor:
    """(B, T, (len(layers) + 1) C): the residual stream at the input of each named layer of a Hugging Face causal LM
    (`model.model.layers`; index L: the input of the final norm), then the features its LM head reads (after the
    final norm). Read with forward pre-hooks, so the states are exactly what each layer receives."""
    inner = model.model
    got: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_module, args, kwargs):
            got[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    mods = [inner.layers[i] if i < len(inner.layers) else inner.norm for i in layers]
    hooks = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in zip(layers, mods)]
    try:
        last = inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([got[i].to(last.dtype) for i in layers] + [last], dim=-1)


def _llama_config(target_config, layers: int):
    from transformers import LlamaConfig

    d = copy.deepcopy(target_config.to_dict())
    d.pop("quantization_config", None)
    d.update(model_type="llama", num_hidden_layers=layers, vocab_size=1, pad_token_id=None, bos_token_id=None,
             eos_token_id=None)  # inputs come as embeddings: a one-row token table
    return LlamaConfig.from_dict(d)


def _first_layer(config):
    """EAGLE-3's first decoder layer (speculators' LlamaDecoderEagle3FirstLayer): q, k, v read 2C, plus `hidden_norm`."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    layer = LlamaDecoderLayer(config, 0)
    C, a = config.hidden_size, layer.self_attn
    for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads),
                        ("v_proj", config.num_key_value_heads)):
        setattr(a, name, nn.Linear(2 * C, heads * a.head_dim, bias=config.attention_bias))
    layer.hidden_norm = LlamaRMSNorm(C, eps=config.rms_norm_eps)
    return layer


class Eagle3Head(nn.Module):
    """fc(target states at `aux_layers`) -> K decoder layers (the first reads [emb ; state]) -> final norm.

    Parameter names are speculators' `eagle3` layout (fc, layers.i, norm); the LM head is the target's over the draft
    vocabulary, frozen, as speculators keeps it (koala.export.speculators writes it as `lm_head`, with d2t / t2d).
    """

    def __init__(self, target_config, layers: int, aux_layers: list[int]):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        self.config = _llama_config(target_config, layers)
        self.aux_layers = check_aux_layers(list(aux_layers), target_config.num_hidden_layers)
        C = self.config.hidden_size
        self.fc = nn.Linear(len(self.aux_layers) * C, C, bias=False)
        self.layers = nn.ModuleList([_first_layer(self.config),
                                     *(LlamaDecoderLayer(self.config, i) for i in range(1, layers))])
        self.norm = LlamaRMSNorm(C, eps=self.config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(self.config)

    def forward(self, aux: torch.Tensor, next_embeds: torch.Tensor, attention_mask=None, unroll: int | None = None):
        """(B, T, A C) target states and (B, T, C) next-token embeddings -> the normed outputs of drafts 1..unroll
        (a list of (B, T, C)), or draft 1's alone without `unroll`. Rows are right-padded (no mask needed)."""
        outs = self.unrolled(aux, next_embeds, unroll or 1)
        return outs if unroll is not None else outs[0]

    def unrolled(self, aux: torch.Tensor, next_embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test as `EagleHead.unrolled` describes it, on EAGLE-3's state: draft 1 reads fc(aux) at slot
        j, draft p > 1 the pre-norm output of draft p-1 at slot j-1; each draft's normed output is returned."""
        T = aux.shape[1]
        pos = torch.arange(T, device=aux.device)
        cos, sin = self.rotary_emb(aux, pos[None])
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        first, outs = self.layers[0], []
        prev = self.fc(aux)
        e = first.input_layernorm(next_embeds)
        for p in range(1, steps + 1):
            g = prev if p == 1 else _shift(prev, 1)
            h = torch.cat([e, first.hidden_norm(g)], dim=-1)
            x = g + _unrolled_attention(first.self_attn, h, cos, sin, past[0], pos)
            x = x + first.mlp(first.post_attention_layernorm(x))
            for layer, kv in zip(self.layers[1:], past[1:]):
                x = x + _unrolled_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, kv, pos)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            prev = x
            outs.append(self.norm(x))
        return outs


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[:, j - k] at slot j (zeros for j < k), along dim 2 for (B, H, T, D) or dim 1 for (B, T, C)."""
    if k == 0:
        return x
    d = 2 if x.dim() == 4 else 1
    pad = torch.zeros_like(x.narrow(d, 0, k))
    return torch.cat([pad, x.narrow(d, 0, x.shape[d] - k)], dim=d)


def _unrolled_attention(attn, h: torch.Tensor, cos, sin, past: list, pos: torch.Tensor) -> torch.Tensor:
    """One attention of draft p = len(past) + 1 under the training-time-test mask; appends its own (K, V) to past.

    Slot j of draft p attends to draft 1's slots i <= j - p + 1 and to draft q's slot j - p + q for q = 2..p: one fused
    attention (SDPA) over draft 1's keys and the later drafts' keys shifted onto slot j, under a (T, p T) mask."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, _ = h.shape
    shape = (B, T, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(h).view(shape).transpose(1, 2)  # (B, H_kv, T, D)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    past.append((k, v))
    p = len(past)
    gqa = q.shape[1] != k.shape[1]
    if p == 1:  # draft 1 is the plain causal forward
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=gqa)
    else:
        # draft q's slot j - p + q shifted onto slot j, q = 2..p (zeros where there is none: those slots are left
        # out of the loss, and a zero key keeps every row of the softmax non-empty)
        keys = torch.cat([past[0][0], *(_shift(past[j - 1][0], p - j) for j in range(2, p + 1))], dim=2)
        values = torch.cat([past[0][1], *(_shift(past[j - 1][1], p - j) for j in range(2, p + 1))], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=_ttt_mask(pos, p), scale=attn.scaling,
                                           enable_gqa=gqa)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _ttt_mask(pos: torch.Tensor, p: int) -> torch.Tensor:
    """(T, p T) bool: slot j sees draft 1's slots i <= j - p + 1, then its own slot in each later draft's block."""
    first = pos[None, :] <= pos[:, None] - (p - 1)  # (T, T)
    diag = pos[None, :] == pos[:, None]
    return torch.cat([first, *([diag] * (p - 1))], dim=1)


def build_heads(kind: str, target_model, layers: int, n_heads: int = 4, embed_norm: bool = True,
                aux_layers: list[int] | None = None) -> nn.Module:
    C = target_model.config.hidden_size
    if kind == "medusa":
        module = MedusaHeads(C, n_heads, layers)
    elif kind == "eagle":
        module = EagleHead(target_model.config, layers, embed_norm)
    elif kind == "eagle3":
        module = Eagle3Head(target_model.config, layers,
                            aux_layers or reference_aux_layers(target_model.config.num_hidden_layers))
    else:
        raise KoalaError(f"head kind must be medusa, eagle or eagle3, got {kind!r}")
    return module.to(device=target_model.device, dtype=target_model.dtype)


def save_heads(module: nn.Module, out_dir: str | Path, info: dict, draft_vocab=None) -> Path:
    """Weights, heads.json and the draft vocabulary, written into a temporary directory renamed into place."""
    from koala.io import atomic_dir
    from koala.models.vocab import save_draft_vocab

    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp / HEADS_WEIGHTS)
        if draft_vocab is not None:
            save_draft_vocab(tmp, draft_vocab)
        info = {**info, "draft_vocab_size": 0 if draft_vocab is None else len(draft_vocab)}
        if isinstance(module, EagleHead):  # what load_heads builds: heads saved before it existed have none
            info["embed_norm"] = module.embed_norm is not None
        if isinstance(module, Eagle3Head):
            info["aux_layers"] = module.aux_layers
        (tmp / HEADS_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def load_heads(path: str | Path, target_model) -> tuple[nn.Module, dict]:
    """Heads saved by `save_heads`, on the target's device and dtype.

    Raises:
        KoalaError: missing files, or heads trained for another target.
    """
    p = Path(path)
    if not (p / HEADS_JSON).exists() or not (p / HEADS_WEIGHTS).exists():
        raise KoalaError(f"{p} holds no draft heads ({HEADS_JSON} + {HEADS_WEIGHTS}): train them with `koala heads`")
    info = json.loads((p / HEADS_JSON).read_text())
    if info.get("hidden_size") != target_model.config.hidden_size or info.get("vocab_size") != \
            target_model.config.vocab_size:
        raise KoalaError(f"heads in {p} were trained for target {info.get('target', {}).get('name')} (hidden "
                         f"{info.get('hidden_size')}, vocabulary {info.get('vocab_size')}): train heads for this target")
    module = build_heads(info["kind"], target_model, info["layers"], info.get("n_heads", 4),
                         embed_norm=info.get("embed_norm", False),  # heads saved before it existed have none
                         aux_layers=info.get("aux_layers"))
    module.load_state_dict(load_file(p / HEADS_WEIGHTS, device=str(target_model.device)))
    return module.eval(), info


