"""`--format sglang`: an EAGLE-3 head (one decoder layer) in the checkpoint layout SGLang serves and SpecForge trains
(`LlamaForCausalLMEagle3`: SafeAILab EAGLE-3's own layout), for

    python -m sglang.launch_server --model TARGET --speculative-algorithm EAGLE3 --speculative-draft-model-path DIR

The layout differs from speculators' (`koala.export.speculators_eagle3`) in names and in what it carries:

* the one decoder layer is `midlayer.*` (its 2C-wide q/k/v, `hidden_norm`, `input_layernorm`), the fusion `fc`, the
  final `norm`, `lm_head` over the draft vocabulary, and the target's `embed_tokens` (SpecForge's model owns a copy);
* `d2t` (draft id -> target id offset) and `t2d` (bool over the target's vocabulary), as in speculators;
* config.json is a Llama config with `architectures: ["LlamaForCausalLMEagle3"]`, `draft_vocab_size`, and
  `eagle_config.eagle_aux_hidden_state_layer_ids`: the target layers whose outputs SGLang captures (koala reads the
  inputs of layers `aux_layers`, i.e. the outputs of `aux_layers - 1`).

SGLang's EAGLE-3 draft has exactly one decoder layer: heads of K > 1 layers are refused with the format that takes
them (speculators). The round trip loads the files with SpecForge's `LlamaForCausalLMEagle3` where the package is
importable (`make test` installs it in an overlay) and runs its own modules over the target's fused states; without
it, it reloads the files into koala's head and compares the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError
from koala.export import speculators_eagle3 as e3

WEIGHTS = "model.safetensors"
SPECFORGE = "0.2.0"


def _renamed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("midlayer." + k[len("layers.0."):]) if k.startswith("layers.0.") else k: v for k, v in sd.items()}


def write(src, out: Path, target: str) -> dict:
    head, t, vocab = e3._head_and_target(src, target)
    if len(head.layers) != 1:
        raise KoalaError(f"--format sglang takes EAGLE-3 heads of one decoder layer (SGLang's draft has one), and "
                         f"{src.path} has {len(head.layers)}: use --format speculators (vLLM), or train --layers 1")
    sd = _renamed(e3.state_dict(head, t, vocab))
    sd["embed_tokens.weight"] = t.model.model.embed_tokens.weight.detach().float().contiguous().clone()
    if vocab is None:  # the mappings SGLang and SpecForge load unconditionally: identity over the whole vocabulary
        V = t.info.vocab_size
        sd["d2t"], sd["t2d"] = torch.zeros(V, dtype=torch.long), torch.ones(V, dtype=torch.bool)
    save_file(sd, out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(config(head, t, vocab), indent=2) + "\n")
    return {"layout": "LlamaForCausalLMEagle3 (SGLang, SpecForge)", "aux_layers": list(head.aux_layers),
            "draft_vocab_size": t.info.vocab_size if vocab is None else len(vocab)}


def config(head, t, vocab) -> dict:
    layer = e3.config(head, t, vocab)["transformer_layer_config"]
    return {**layer, "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1,
            "vocab_size": t.info.vocab_size, "draft_vocab_size": t.info.vocab_size if vocab is None else len(vocab),
            "target_hidden_size": t.model.config.hidden_size, "torch_dtype": "float32",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [a - 1 for a in head.aux_layers]}}


@torch.no_grad()
def package_logits(out: Path, ids: torch.Tensor, aux: torch.Tensor) -> tuple:
    """The export run by SpecForge's own model class: from_pretrained, then embed, fc, midlayer, norm and its LM head.
    Returns (logits over the draft vocabulary (T, K), the target id of each draft id (K,))."""
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3

    m = LlamaForCausalLMEagle3.from_pretrained(str(out), attention_backend="sdpa").float().eval()
    # The rotary tables are buffers the class computes in its constructor and never saves; transformers 5 builds the
    # model on the meta device and leaves such buffers uninitialised, so they are computed again by the class itself.
    m.midlayer.self_attn._init_rope()
    T = ids.shape[0]
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    h = m.backbone(input_embeds=m.embed_input_ids(ids[None]), hidden_states=m.project_hidden_states(aux[None]),
                   cache_hidden=None, attention_mask=mask, position_ids=pos, use_cache=False)
    logits = m.compute_logits(h[0] if isinstance(h, tuple) else h)[0]
    K = logits.shape[-1]
    return logits, torch.arange(K) + m.d2t


@torch.no_grad()
def reloaded_logits(out: Path, ids: torch.Tensor, aux: torch.Tensor, target: str) -> tuple:
    """Without SpecForge: the files loaded strictly back into koala's head (names mapped back), the same logits."""
    from koala.export import load_target
    from koala.models.heads import Eagle3Head

    cfg = json.loads((out / "config.json").read_text())
    w = load_file(out / WEIGHTS)
    t = load_target(target)
    aux_layers = [a + 1 for a in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    head = Eagle3Head(t.model.config, 1, aux_layers).float().eval()
    back = {("layers.0." + k[len("midlayer."):]) if k.startswith("midlayer.") else k: v for k, v in w.items()}
    head.load_state_dict({k: v for k, v in back.items() if k not in ("lm_head.weight", "d2t", "t2d",
                                                                      "embed_tokens.weight")})
    logits = head(aux[None], w["embed_tokens.weight"][ids][None])[0] @ w["lm_head.weight"].T
    return logits, torch.arange(logits.shape[-1]) + w["d2t"]


@torch.no_grad()
def check(src, out: Path, target: str) -> dict:
    ours, embed, ids, aux, vocab = e3.koala_inputs(src, target)
    try:
        theirs = package_logits(out, ids, aux)
        via = f"SpecForge {SPECFORGE} LlamaForCausalLMEagle3"
    except ImportError:
        theirs, via = reloaded_logits(out, ids, aux, target), "koala's head, reloaded"
    logits, to_target = theirs
    if vocab is None:  # the identity mapping over the whole vocabulary
        vocab = list(range(logits.shape[-1]))
    return e3.compare(ours, logits, to_target, vocab, via, "sglang")


if __name__ == "__main__":  # python -m koala.export.sglang DIR INPUTS OUT: package_logits where SpecForge is importable
    import sys

    x = load_file(sys.argv[2])
    logits, to_target = package_logits(Path(sys.argv[1]), x["ids"], x["aux"])
    save_file({"logits": logits.contiguous(), "to_target": to_target.contiguous()}, sys.argv[3])
