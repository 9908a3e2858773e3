"""The independent drafter of Goel et al. 2024: a small LlamaForCausalLM sharing the target's tokenizer.

Being a plain Hugging Face causal LM, a koala drafter works unchanged as `assistant_model` in transformers, in
koala's engine (`koala eval --drafter DIR`) and in any serving stack that takes a draft model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from koala.config import DrafterConfig
from koala.errors import KoalaError
from koala.targets import Target

KOALA_JSON = "koala.json"


def default_copy_layers(n_target: int, n_drafter: int) -> list[int]:
    """Target layers to copy, spread evenly and always including the first and the last."""
    if n_drafter == 1:
        return [n_target - 1]
    return [round(i * (n_target - 1) / (n_drafter - 1)) for i in range(n_drafter)]


def drafter_config(target_config, cfg: DrafterConfig) -> LlamaConfig:
    """The target's config (vocabulary, RoPE, special tokens) with the drafter's depth and width."""
    d = copy.deepcopy(target_config.to_dict())
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=cfg.layers)
    for key, value in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size),
                       ("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads)):
        if value is not None:
            d[key] = value
    if cfg.hidden_size is not None or cfg.num_heads is not None:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return LlamaConfig.from_dict(d)


def build_drafter(target: Target, cfg: DrafterConfig, seed: int = 0) -> LlamaForCausalLM:
    """A new drafter for `target`, initialised as `cfg.init` says.

    Raises:
        KoalaError: the drafter cannot share the target's embeddings (hidden sizes differ) or copy its layers.
    """
    tc = target.model.config
    config = drafter_config(tc, cfg)
    if cfg.init == "target" and config.hidden_size != tc.hidden_size:
        raise KoalaError(
            f"drafter hidden size {config.hidden_size} cannot share the target's embeddings ({tc.hidden_size}) "
            f"without a projection: set drafter.hidden_size to {tc.hidden_size} (or null), or drafter.init=random"
        )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=target.model.dtype)
    if cfg.init == "target":
        src = target.model
        model.model.embed_tokens.weight.data.copy_(src.model.embed_tokens.weight.data)
        model.model.norm.weight.data.copy_(src.model.norm.weight.data)
        if not config.tie_word_embeddings:
            model.lm_head.weight.data.copy_(src.lm_head.weight.data)
        layers = cfg.copy_layers or default_copy_layers(tc.num_hidden_layers, cfg.layers)
        if len(layers) != cfg.layers or not all(0 <= i < tc.num_hidden_layers for i in layers):
            raise KoalaError(f"drafter.copy_layers must name {cfg.layers} target layers in 0..{tc.num_hidden_layers - 1}, "
                             f"got {layers}")
        same_shape = (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (
            tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads)
        if same_shape:
            for dst, i in zip(model.model.layers, layers):
                dst.load_state_dict(src.model.layers[i].state_dict())
    if cfg.embeddings == "frozen":
        for p in (model.model.embed_tokens.weight, model.lm_head.weight):
            p.requires_grad_(False)
    return model.to(target.model.device)


def save_drafter(model: LlamaForCausalLM, tokenizer, out_dir: str | Path, info: dict, draft_vocab=None) -> Path:
    """save_pretrained (safetensors) with the tokenizer, koala.json (target, training config, data hash) and the
    draft vocabulary, written into a temporary directory renamed into place: never seen half-written."""
    from koala.io import atomic_dir
    from koala.models.vocab import save_draft_vocab

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if draft_vocab is not None:
            save_draft_vocab(tmp, draft_vocab)
        info = {**info, "draft_vocab_size": 0 if draft_vocab is None else len(draft_vocab)}
        (tmp / KOALA_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)
