"""`--format speculators`: an EAGLE head as the `eagle` speculator of vLLM's speculators package, version 0.4.0.1
(EAGLE-3 heads: speculators 0.9.0's `eagle3`, which vLLM serves; koala.export.speculators_eagle3).

0.4.0.1 is the last release that defines EAGLE-1 / HASS speculators (`speculators_model_type: eagle`, class
`EagleSpeculator`); later releases hold EAGLE-3 and newer methods only. Its forward, for K = 1 with `layernorms` and
`fusion_bias` on (the package's variant with the extra norms; plain EAGLE-1 has neither):

    e = embedding_layernorm(embed_tokens(x_{t+1}));  h = fusion_fc([e ; f_t])
    h = transformer(h)            (one LlamaDecoderLayer, its input_layernorm kept)
    logits = lm_head(pre_lm_head_layernorm(h))

koala's EAGLE head is the same function with [f_t ; e] in the other order: the export swaps fusion_fc's column
blocks, renames `decoder.layers.0` to `transformer` and `decoder.norm` to `pre_lm_head_layernorm`. `embed_tokens`,
`lm_head` and the rotary embedding are the verifier's (the target's), never saved, as the package defines. The
package cannot hold K > 1 layers, nor a draft vocabulary: the export drafts over the full vocabulary (its logits
over koala's draft vocabulary are koala's). Serving: vLLM's speculators loader reads `eagle3` configs only (checked
in vLLM's `transformers_utils/configs/speculators/algos.py`), so this export is for the speculators package and
engines built on it (train `--kind eagle3` for a head vLLM serves); the round trip loads it with the package's own classes (`SpeculatorModel.from_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError
from koala.export import verifier_name

VERSION = "0.4.0.1"
WEIGHTS = "model.safetensors"


def _head_and_target(src, target: str):
    from koala.models.heads import load_heads
    from koala.models.vocab import load_draft_vocab
    from koala.export import load_target

    if src.info["layers"] != 1:
        raise KoalaError(f"{src.path} holds an EAGLE head of {src.info['layers']} layers; the speculators eagle format "
                         "holds one: train K = 1 (koala heads --kind eagle --layers 1) to export it")
    if not src.info.get("embed_norm"):
        raise KoalaError(f"{src.path} was trained before EAGLE heads had an embedding norm, which the speculators "
                         "format requires: train it again with koala heads --kind eagle")
    t = load_target(target)
    head, _ = load_heads(src.path, t.model)
    return head.float(), t, load_draft_vocab(src.path)


def state_dict(head) -> dict[str, torch.Tensor]:
    """koala's EagleHead (K = 1, embed_norm) as the speculator's weights."""
    C = head.config.hidden_size
    w = head.fc.weight.detach()
    out = {"fusion_fc.weight": torch.cat([w[:, C:], w[:, :C]], dim=1),  # koala [f ; e] -> speculators [e ; f]
           "fusion_fc.bias": head.fc.bias.detach(),
           "embedding_layernorm.weight": head.embed_norm.weight.detach(),
           "pre_lm_head_layernorm.weight": head.decoder.norm.weight.detach()}
    for k, v in head.decoder.layers[0].state_dict().items():
        out[f"transformer.{k}"] = v.detach()
    return {k: v.float().contiguous().clone() for k, v in out.items()}


def config(head, t) -> dict:
    c = head.config
    layer = {k: getattr(c, k) for k in ("attention_bias", "attention_dropout", "head_dim", "hidden_act",
                                         "hidden_size", "intermediate_size", "max_position_embeddings", "mlp_bias",
                                         "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise KoalaError(f"the target's RoPE scaling {rope['rope_type']!r} is not written by the speculators export "
                         "(its eagle config takes rope_theta alone): export is limited to targets without RoPE scaling")
    layer.update(model_type="llama", num_hidden_layers=1, vocab_size=t.info.vocab_size,
                 rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))), rope_scaling=None)
    return {"architectures": ["EagleSpeculator"], "speculators_model_type": "eagle", "speculators_version": VERSION,
            "transformer_layer_architecture": "LlamaDecoderLayer", "transformer_layer_config": layer,
            "layernorms": True, "fusion_bias": True, "dtype": "float32",
            "speculators_config": speculators_section("eagle", t)}


def speculators_section(algorithm: str, t) -> dict:
    """The config's `speculators_config`: the algorithm, greedy proposals of 3 tokens, the verifier (the target)."""
    return {"algorithm": algorithm, "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                                  "accept_tolerance": 0.0}],
            "verifier": {"architectures": list(t.model.config.architectures or ["LlamaForCausalLM"]),
                         "name_or_path": verifier_name(t)}}


def write(src, out: Path, target: str) -> dict:
    head, t, vocab = _head_and_target(src, target)
    save_file(state_dict(head), out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(config(head, t), indent=2) + "\n")
    return {"speculators_version": VERSION, "layers": 1, "draft_vocab_size": 0 if vocab is None else len(vocab)}


@torch.no_grad()
def reference_logits(out: Path, embed: torch.Tensor, lm_head: torch.Tensor, ids: torch.Tensor,
                     feats: torch.Tensor) -> torch.Tensor:
    """The speculator's forward as speculators 0.4.0.1 writes it (eagle.py, EagleSpeculator.forward), from the
    exported files alone, for a Python without the package: ids (T,), feats (T, C) -> logits (T, V)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    cfg = json.loads((out / "config.json").read_text())
    w = load_file(out / WEIGHTS)
    lc = LlamaConfig(**{k: v for k, v in cfg["transformer_layer_config"].items() if k != "model_type"})
    lc._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(lc, layer_idx=0)
    layer.load_state_dict({k.removeprefix("transformer."): v for k, v in w.items() if k.startswith("transformer.")})
    norm_e, norm_h = LlamaRMSNorm(lc.hidden_size, lc.rms_norm_eps), LlamaRMSNorm(lc.hidden_size, lc.rms_norm_eps)
    norm_e.weight.data, norm_h.weight.data = w["embedding_layernorm.weight"], w["pre_lm_head_layernorm.weight"]
    e = norm_e(embed[ids])[None]
    h = torch.nn.functional.linear(torch.cat([e, feats[None]], -1), w["fusion_fc.weight"], w["fusion_fc.bias"])
    pos = torch.arange(ids.shape[0])[None]
    y = layer(h, attention_mask=None, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(lc)(h, pos))
    y = y[0] if isinstance(y, tuple) else y
    return (norm_h(y) @ lm_head.T)[0]


def package_logits(out: Path, embed: torch.Tensor, lm_head: torch.Tensor, ids: torch.Tensor,
                   feats: torch.Tensor) -> torch.Tensor:
    """The same with the package's own classes (`speculators` importable): loaded by SpeculatorModel.from_pretrained
    with the verifier detached, the verifier's embeddings, LM head and rotary embedding put in as the package does."""
    from speculators import SpeculatorModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    m = SpeculatorModel.from_pretrained(str(out), verifier_attachment_mode="detached").float().eval()
    m.embed_tokens = torch.nn.Embedding.from_pretrained(embed)
    m.lm_head = torch.nn.Linear(embed.shape[1], lm_head.shape[0], bias=False)
    m.lm_head.weight.data = lm_head
    m.rotary_emb = LlamaRotaryEmbedding(config=m.config.transformer_layer_config)
    m.config.transformer_layer_config._attn_implementation = "sdpa"
    with torch.no_grad():  # batch 1: the package's decoder call keeps the first row only
        return m(input_ids=ids[None], hidden_states=feats[None], return_dict=True).logits.reshape(len(ids), -1)


def koala_inputs(src, target: str):
    """koala's EAGLE logits on the probe batch's features, and the inputs a speculator takes for the same drafts:
    (ours (T, V), embed (V, C), lm_head (V, C), ids (T,), feats (T, C), draft vocabulary or None)."""
    from koala.export import probe_ids

    head, t, vocab = _head_and_target(src, target)
    with torch.no_grad():
        ids = probe_ids(t.tokenizer)[0]
        f = t.model.model(ids[None]).last_hidden_state[0].float()  # (T, C): what the LM head reads
        feats, nxt = f[:-1], ids[1:]  # slot j reads (f_j, x_{j+1}) and predicts x_{j+2}
        y = head(feats[None], t.model.model.embed_tokens(nxt)[None])
        ours = t.model.lm_head(y)[0].float()
    return ours, t.model.model.embed_tokens.weight.detach().float(), t.model.lm_head.weight.detach().float(), nxt, \
        feats, vocab


def compare(ours: torch.Tensor, theirs: torch.Tensor, vocab, via: str) -> dict:
    """koala's logits and the speculator's agree over koala's draft vocabulary, and so do their greedy drafts."""
    from koala.export import require

    cols = torch.arange(ours.shape[-1]) if vocab is None else vocab
    d, scale = float((ours[:, cols] - theirs[:, cols]).abs().max()), float(ours.abs().max())
    require(d <= 1e-4 * max(1.0, scale), "speculators", f"{via}: logits differ by {d:.3g}")
    require(torch.equal(ours[:, cols].argmax(-1), theirs[:, cols].argmax(-1)), "speculators",
            f"{via}: greedy drafts differ")
    return {"loaded_with": via, "max_abs_logit_diff": d, "logit_scale": scale,
            "greedy_drafts_identical": int(ours.shape[0])}


@torch.no_grad()
def check(src, out: Path, target: str) -> dict:
    ours, embed, lm, ids, feats, vocab = koala_inputs(src, target)
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("speculators")  # the package's own classes where this version is installed
    except PackageNotFoundError:
        installed = None
    if installed != VERSION:
        return compare(ours, reference_logits(out, embed, lm, ids, feats), vocab, "reference forward")
    return compare(ours, package_logits(out, embed, lm, ids, feats), vocab, f"speculators {VERSION}")


if __name__ == "__main__":  # python -m koala.export.speculators DIR INPUTS OUT: package_logits in another Python
    import sys

    x = load_file(sys.argv[2])
    save_file({"logits": package_logits(Path(sys.argv[1]), x["embed"], x["lm_head"], x["ids"], x["feats"])},
              sys.argv[3])
