"""`--format gguf`: the independent drafter as one GGUF file in the layout llama.cpp reads for Llama models.

    llama-server -m TARGET.gguf -md OUT/drafter.gguf --draft-max 8     (llama-speculative takes the same -md)

Tensors are named as llama.cpp's `convert_hf_to_gguf.py` names them (`token_embd`, `blk.N.attn_q`, ...), with the
query and key projections permuted the way it permutes them for its RoPE layout (transformers' GGUF loader undoes
it). Weights stay float32 (float16 when the drafter is float16): the drafter is small, and quantising it would
change what it drafts. llama.cpp drafts only with a vocabulary identical to the target's, so the tokenizer is
copied field by field from the target's GGUF when the target is one, and otherwise written from the drafter's
Hugging Face tokenizer (byte-level BPE, as llama.cpp's gpt2 tokenizer model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from koala.errors import KoalaError

FILE = "drafter.gguf"
LAYER_TENSORS = {  # Hugging Face LlamaDecoderLayer name -> llama.cpp block tensor
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of a query or key projection (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp tensor name of a LlamaForCausalLM parameter (None: not stored, e.g. rotary buffers)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        inner, leaf = ".".join(parts[3:-1]), parts[-1]
        if inner in LAYER_TENSORS and leaf == "weight":
            return f"blk.{parts[2]}.{LAYER_TENSORS[inner]}.weight"
    raise KoalaError(f"{hf_name}: the gguf export writes Llama drafters without biases; this drafter has a "
                     "parameter llama.cpp's Llama layout does not hold: export it with --format hf")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise KoalaError(f"the drafter's RoPE scaling {kind!r} is not written by the gguf export: use --format hf")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write(src, out: Path, target: str) -> dict:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.path, dtype="auto")
    c = model.config
    if c.model_type != "llama":
        raise KoalaError(f"{src.path} is a {c.model_type} model: the gguf export writes Llama drafters; use "
                         "--format hf")
    half = model.dtype == torch.float16
    w = gguf.GGUFWriter(out / FILE, "llama")
    w.add_name(f"koala drafter for {target}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    tokenizer_from = _add_tokenizer(w, target, AutoTokenizer.from_pretrained(src.path), c.vocab_size)
    n = 0
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp reads token_embd as the output head when output.weight is absent
        t = p.detach().float()
        if name.endswith("q_proj.weight"):
            t = permute(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, c.num_key_value_heads)
        arr = t.numpy().astype(np.float16 if half and t.dim() == 2 else np.float32)
        w.add_tensor(gguf_name(name), arr)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": FILE, "tensors": n, "tensor_dtype": "f16" if half else "f32", "tokenizer_from": tokenizer_from,
            "serve": f"llama-server -m TARGET.gguf -md {out.name}/{FILE}"}


def _add_tokenizer(w, target: str, tokenizer, vocab_size: int) -> str:
    """The target's vocabulary: copied from its GGUF when it is one, else built from the Hugging Face tokenizer."""
    from koala.targets import _resolve

    _, source, gguf_file = _resolve(target)
    if gguf_file is not None:
        _copy_tokenizer(w, Path(source) / gguf_file)
        return str(Path(source) / gguf_file)
    _bpe_tokenizer(w, tokenizer, vocab_size)
    return "hf tokenizer (byte-level BPE)"


def _copy_tokenizer(w, path: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)


def _bpe_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types, merges, special ids."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise KoalaError(f"the drafter's tokenizer is {model.get('type')}, not byte-level BPE: pass --target the "
                         "target's .gguf (llama.cpp's convert_hf_to_gguf.py writes it), whose vocabulary is copied")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        t = added.get(i)
        types.append(TokenType.UNUSED if i not in by_id else TokenType.NORMAL if t is None else
                     TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_pad_token_id, tokenizer.pad_token_id), (w.add_unk_token_id, tokenizer.unk_token_id)):
        if tid is not None:
            setter(tid)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def load(out: Path):
    """The export loaded back with transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, gguf_file=FILE, dtype=torch.float32).eval()


def check(src, out: Path, target: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from koala.export import compare_causal_lms, probe_ids

    ours = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    saved = json.loads((src.path / "config.json").read_text())
    half = (saved.get("dtype") or saved.get("torch_dtype")) == "float16"
    r = compare_causal_lms("gguf", ours, load(out), probe_ids(AutoTokenizer.from_pretrained(src.path)),
                           atol=1e-3 if half else 1e-5)
    return {**r, "loaded_with": "transformers' GGUF reader"}
