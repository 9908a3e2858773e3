"""`--format medusa`: Medusa heads in the Medusa project's layout, and in vLLM's, in one directory.

    vllm serve TARGET --speculative-config '{"method": "medusa", "model": "OUT", "num_speculative_tokens": N}'

* `medusa_lm_head.pt`: the Medusa repo's `medusa_head` state dict (FasterDecoding/Medusa, `medusa_model.py`), read
  by its `MedusaModel` and by TensorRT-LLM's Medusa converter: head i is `nn.Sequential(ResBlock x K,
  nn.Linear(H, V, bias=False))`, keys `{i}.{j}.linear.weight|bias` and `{i}.{K}.weight`. koala's heads feed the
  target's frozen LM head, so `{i}.{K}.weight` is the target's LM head, once per head. The Medusa repo builds its K
  blocks as one module repeated (`[ResBlock(h)] * K`), so its own loader holds K = 1 heads only; TensorRT-LLM and
  vLLM read K > 1.
* `model.safetensors` with `config.json`: vLLM's Medusa model (`vllm/model_executor/models/medusa.py`), keys
  `blocks.{i}.layers.{j}.weight|bias` and one `lm_heads.0.weight` that every head shares (`original_lm_head`, as
  koala's heads share the target's); the config sets `medusa_fc_bias` (vLLM drops the blocks' biases without it).
  A draft vocabulary is written as vLLM's `token_map` with `truncated_vocab_size`, so vLLM drafts over the same
  subset as koala; the Medusa repo has no such notion and drafts over the full vocabulary.

Both read the target's last hidden state after its final norm (what its LM head reads), as koala's heads do, and
head i (from 0) predicts the token i + 2 places after that state's position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koala.export import verifier_name

MEDUSA_PT, VLLM_WEIGHTS = "medusa_lm_head.pt", "model.safetensors"


def _heads_and_target(src, target: str):
    from koala.models.heads import load_heads
    from koala.models.vocab import load_draft_vocab
    from koala.export import load_target

    t = load_target(target)
    heads, info = load_heads(src.path, t.model)
    return heads.float(), t, load_draft_vocab(src.path)


def write(src, out: Path, target: str) -> dict:
    heads, t, vocab = _heads_and_target(src, target)
    lm = t.model.lm_head.weight.detach().float().contiguous()
    n, layers = len(heads.heads), src.info["layers"]
    medusa, vllm = {}, {}
    for i, head in enumerate(heads.heads):
        for j, block in enumerate(head):
            for p in ("weight", "bias"):
                w = getattr(block.linear, p).detach().float().contiguous()
                medusa[f"{i}.{j}.linear.{p}"] = w
                vllm[f"blocks.{i}.layers.{j}.{p}"] = w.clone()
        medusa[f"{i}.{layers}.weight"] = lm
    vllm["lm_heads.0.weight"] = (lm if vocab is None else lm[vocab]).contiguous()  # one head shared by all
    if vocab is not None:
        vllm["token_map"] = vocab.clone()
    torch.save(medusa, out / MEDUSA_PT)
    save_file(vllm, out / VLLM_WEIGHTS)
    V, H = lm.shape
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": H, "vocab_size": V,
              "num_heads": n, "num_hidden_layers": layers, "medusa_num_heads": n, "medusa_num_layers": layers,
              "medusa_fc_bias": True, "original_lm_head": True, "truncated_vocab_size": V if vocab is None else
              len(vocab), "base_model_name_or_path": verifier_name(t), "max_paths": 64, "topk": 10,
              "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"heads": n, "layers": layers, "draft_vocab_size": 0 if vocab is None else len(vocab),
            "medusa_repo_loads": layers == 1}


def medusa_repo_heads(state: dict, n: int, layers: int, hidden: int, vocab: int, resblock=None) -> torch.nn.Module:
    """The Medusa repo's `medusa_head` holding `state` (strict): `resblock` is its ResBlock class where the package
    is installed; otherwise the same definition, x + SiLU(Linear(x))."""
    from koala.models.heads import ResBlock

    block = resblock or ResBlock
    m = torch.nn.ModuleList(torch.nn.Sequential(*[block(hidden) for _ in range(layers)],
                                                torch.nn.Linear(hidden, vocab, bias=False)) for _ in range(n))
    m.load_state_dict(state, strict=True)
    return m.eval()


def vllm_logits(state: dict, config: dict, f: torch.Tensor) -> torch.Tensor:
    """vLLM's Medusa forward on features f (N, H), from its weights: (n_heads, N, V), -inf outside the token map."""
    out = []
    for i in range(config["num_heads"]):
        x = f
        for j in range(config["num_hidden_layers"]):
            x = x + torch.nn.functional.silu(x @ state[f"blocks.{i}.layers.{j}.weight"].T +
                                             state[f"blocks.{i}.layers.{j}.bias"])
        logits = x @ state.get(f"lm_heads.{i}.weight", state["lm_heads.0.weight"]).T  # original_lm_head: shared
        if "token_map" in state:
            full = torch.full((*logits.shape[:-1], config["vocab_size"]), float("-inf"))
            logits = full.index_copy_(-1, state["token_map"], logits)
        out.append(logits)
    return torch.stack(out)


def check(src, out: Path, target: str, resblock=None) -> dict:
    """koala's Medusa drafter and both layouts give the same logits over the draft vocabulary, and the same greedy
    drafts, on the target's features of the probe batch."""
    from koala.export import probe_ids, require

    heads, t, vocab = _heads_and_target(src, target)
    with torch.no_grad():
        f = t.model.model(probe_ids(t.tokenizer)).last_hidden_state.float().flatten(0, 1)  # (N, H)
        ours = t.model.lm_head(heads(f)).float()  # (n, N, V)
        config = json.loads((out / "config.json").read_text())
        theirs_vllm = vllm_logits(load_file(out / VLLM_WEIGHTS), config, f)
        state = torch.load(out / MEDUSA_PT, weights_only=True, map_location="cpu")
        repo = medusa_repo_heads(state, config["medusa_num_heads"], config["medusa_num_layers"], config["hidden_size"],
                                 config["vocab_size"], resblock)
        theirs_repo = torch.stack([h(f) for h in repo]).float()
    cols = torch.arange(ours.shape[-1]) if vocab is None else vocab
    scale = float(ours.abs().max())
    diffs = {name: float((ours[..., cols] - x[..., cols]).abs().max()) for name, x in
             (("vllm", theirs_vllm), ("medusa_repo", theirs_repo))}
    for name, d in diffs.items():
        require(d <= 1e-4 * max(1.0, scale), "medusa", f"{name} layout: logits differ by {d:.3g}")
    drafts = ours[..., cols].argmax(-1)
    require(torch.equal(cols[drafts], theirs_vllm.argmax(-1)), "medusa", "vLLM layout: greedy drafts differ")
    require(torch.equal(drafts, theirs_repo[..., cols].argmax(-1)), "medusa", "Medusa layout: greedy drafts differ")
    return {"max_abs_logit_diff_vllm": diffs["vllm"], "max_abs_logit_diff_medusa_repo": diffs["medusa_repo"],
            "logit_scale": scale, "greedy_drafts_identical": int(drafts.numel()), "features": int(f.shape[0]),
            "loaded_with": "the Medusa repo's head layout and vLLM's"}
