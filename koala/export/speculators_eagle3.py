"""`--format speculators` for EAGLE-3 heads: the `eagle3` speculator of vLLM's speculators package, version 0.9.0,
which `vllm serve --speculative-config` loads.

koala's Eagle3Head already has the package's layout (`fc`, `layers.0` with its 2C-wide q/k/v and `hidden_norm`,
`layers.i`, `norm`), so the export writes its weights under their own names, plus:

* `lm_head.weight`: the target's LM head over the draft vocabulary (koala trains against it frozen; the package
  keeps it frozen too), or over the whole vocabulary when the heads have none;
* `d2t` (draft id -> target id offset, `target = draft + d2t[draft]`) and `t2d` (a bool mask over the target's
  vocabulary), the package's and vLLM's vocabulary mapping, when there is a draft vocabulary.

`embed_tokens` and the rotary embedding are the verifier's (the target's) and are not saved, as the package defines.
The config names the fused layers (`eagle_aux_hidden_state_layer_ids`), which vLLM reads to collect the target's
states. The round trip loads the files with the package's own `SpeculatorModel.from_pretrained` and runs its own
modules (fc, first layer, decoder layers, norm, LM head) over the target's fused states; without the package it
reloads the files into koala's head and compares the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.errors import KoalaError
from koala.export.speculators import speculators_section

VERSION = "0.9.0"
WEIGHTS = "model.safetensors"


def _head_and_target(src, target: str):
    from koala.export import load_target
    from koala.models.heads import load_heads
    from koala.models.vocab import load_draft_vocab

    t = load_target(target)
    head, _ = load_heads(src.path, t.model)
    return head.float(), t, load_draft_vocab(src.path)


def state_dict(head, t, vocab) -> dict[str, torch.Tensor]:
    out = {k: v.detach().float() for k, v in head.state_dict().items() if not k.startswith("rotary_emb.")}
    w = t.model.lm_head.weight.detach().float()
    if vocab is None:
        out["lm_head.weight"] = w
    else:
        ids = torch.as_tensor(vocab).long()
        out["lm_head.weight"] = w[ids]
        out["d2t"] = ids - torch.arange(len(ids))
        t2d = torch.zeros(w.shape[0], dtype=torch.bool)
        t2d[ids] = True
        out["t2d"] = t2d
    return {k: v.contiguous().clone() for k, v in out.items()}


def config(head, t, vocab) -> dict:
    layer = head.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        layer.pop(k, None)
    layer.update(model_type="llama", num_hidden_layers=len(head.layers), vocab_size=t.info.vocab_size,
                 tie_word_embeddings=False)
    rope = layer.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise KoalaError(f"the target's RoPE scaling {rope['rope_type']!r} is not exported to speculators' eagle3 "
                         "config: export is limited to targets with default or llama3 RoPE")
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": VERSION,
            "transformer_layer_config": layer, "draft_vocab_size": t.info.vocab_size if vocab is None else len(vocab),
            "norm_before_residual": False, "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": list(head.aux_layers), "norm_before_fc": False, "fc_norm": False,
            "norm_output": False, "embed_requires_grad": False, "dtype": "float32",
            "speculators_config": speculators_section("eagle3", t)}


def write(src, out: Path, target: str) -> dict:
    head, t, vocab = _head_and_target(src, target)
    save_file(state_dict(head, t, vocab), out / WEIGHTS)
    (out / "config.json").write_text(json.dumps(config(head, t, vocab), indent=2) + "\n")
    return {"speculators_version": VERSION, "algorithm": "eagle3", "layers": len(head.layers),
            "aux_layers": list(head.aux_layers), "draft_vocab_size": 0 if vocab is None else len(vocab)}


@torch.no_grad()
def koala_inputs(src, target: str):
    """koala's EAGLE-3 logits (draft 1) on the probe batch, and what a speculator takes for the same drafts:
    (ours (T, V), embed (V, C), ids (T,) next tokens, aux (T, A C) the target's fused states, vocabulary or None)."""
    from koala.export import probe_ids
    from koala.models.heads import aux_states

    head, t, vocab = _head_and_target(src, target)
    ids = probe_ids(t.tokenizer)[0]
    f = aux_states(t.model, ids[None], None, head.aux_layers)[0].float()
    C = t.model.config.hidden_size
    aux, nxt = f[:-1, :-C], ids[1:]  # slot j reads (states at j, x_{j+1}) and predicts x_{j+2}
    embed = t.model.model.embed_tokens.weight.detach().float()
    ours = t.model.lm_head(head(aux[None], embed[nxt][None]))[0].float()
    return ours, embed, nxt, aux, vocab


@torch.no_grad()
def package_logits(out: Path, embed: torch.Tensor, ids: torch.Tensor, aux: torch.Tensor) -> tuple:
    """The export run by the package's own classes (`speculators` 0.9.0 importable): loaded by
    SpeculatorModel.from_pretrained with the verifier detached (its name left unresolved and its weights not fetched:
    the verifier's embeddings are put in here; the LM head and d2t / t2d come from the checkpoint), then its fc, layers, norm and LM head as Eagle3DraftModel.forward's first step runs them.
    Returns (logits over the draft vocabulary (T, K), the target id of each draft id (K,))."""
    import shutil
    import tempfile

    from speculators import SpeculatorModel
    from speculators.models.eagle3 import Eagle3DraftModel

    Eagle3DraftModel.load_verifier_weights = lambda self: None  # detached: the verifier's embeddings are put in below
    with tempfile.TemporaryDirectory() as d:
        for f in (WEIGHTS, "config.json"):
            shutil.copy(out / f, Path(d) / f)
        cfg = json.loads((out / "config.json").read_text())
        cfg["speculators_config"]["verifier"]["name_or_path"] = None  # no verifier download: detached
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        m = SpeculatorModel.from_pretrained(d).float().eval()
    m.embed_tokens.weight.data = embed.clone()
    for layer in m.layers:
        layer.self_attn.config._attn_implementation = "sdpa"
    x = torch.cat([m.embed_tokens(ids)[None], m.fc(aux[None])], dim=-1)
    pos = torch.arange(ids.shape[0])[None]
    pe = m.rotary_emb(x, pos)
    for layer in m.layers:
        x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        x = x[0] if isinstance(x, tuple) else x
    logits = m.lm_head(m.norm(x))[0]
    K = logits.shape[-1]
    return logits, (torch.arange(K) if m.d2t is None else torch.arange(K) + m.d2t)


@torch.no_grad()
def reloaded_logits(out: Path, embed: torch.Tensor, ids: torch.Tensor, aux: torch.Tensor, src, target: str) -> tuple:
    """Without the package: the exported weights loaded strictly back into koala's head, the same logits."""
    from koala.export import load_target
    from koala.models.heads import Eagle3Head

    cfg = json.loads((out / "config.json").read_text())
    w = load_file(out / WEIGHTS)
    t = load_target(target)
    head = Eagle3Head(t.model.config, cfg["transformer_layer_config"]["num_hidden_layers"],
                      cfg["eagle_aux_hidden_state_layer_ids"]).float().eval()
    head.load_state_dict({k: v for k, v in w.items() if k not in ("lm_head.weight", "d2t", "t2d")})
    logits = head(aux[None], embed[ids][None])[0] @ w["lm_head.weight"].T
    K = logits.shape[-1]
    return logits, (torch.arange(K) + w["d2t"] if "d2t" in w else torch.arange(K))


def compare(ours: torch.Tensor, theirs: torch.Tensor, to_target: torch.Tensor, vocab, via: str,
            fmt: str = "speculators") -> dict:
    """koala's logits and the exported head's agree over the draft vocabulary, whose d2t mapping is koala's, and so
    do their greedy drafts."""
    from koala.export import require

    cols = torch.arange(ours.shape[-1]) if vocab is None else torch.as_tensor(vocab).long()
    require(torch.equal(to_target, cols), fmt, f"{via}: d2t maps the draft vocabulary elsewhere")
    d, scale = float((ours[:, cols] - theirs).abs().max()), float(ours.abs().max())
    require(d <= 1e-4 * max(1.0, scale), fmt, f"{via}: logits differ by {d:.3g}")
    require(torch.equal(ours[:, cols].argmax(-1), theirs.argmax(-1)), fmt, f"{via}: greedy drafts differ")
    return {"loaded_with": via, "max_abs_logit_diff": d, "logit_scale": scale,
            "greedy_drafts_identical": int(ours.shape[0]), "d2t_checked": vocab is not None}


@torch.no_grad()
def check(src, out: Path, target: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    ours, embed, ids, aux, vocab = koala_inputs(src, target)
    try:
        installed = version("speculators")
    except PackageNotFoundError:
        installed = None
    if installed != VERSION:
        return compare(ours, *reloaded_logits(out, embed, ids, aux, src, target), vocab, "koala's head, reloaded")
    return compare(ours, *package_logits(out, embed, ids, aux), vocab, f"speculators {VERSION}")


if __name__ == "__main__":  # python -m koala.export.speculators_eagle3 DIR INPUTS OUT: package_logits, another path
    import sys

    x = load_file(sys.argv[2])
    logits, to_target = package_logits(Path(sys.argv[1]), x["embed"], x["ids"], x["aux"])
    save_file({"logits": logits.contiguous(), "to_target": to_target.contiguous()}, sys.argv[3])
