"""`--format hf`: the independent drafter as a standard Hugging Face causal LM.

It already is one (koala saves it with `save_pretrained`): the export loads it with `AutoModelForCausalLM`, writes
it with its tokenizer and generation config, and keeps the draft vocabulary beside it. The LM head is the full
vocabulary's: rows outside the draft vocabulary keep their values from the drafter's initialisation, so an engine
that ignores `draft_vocab.safetensors` drafts over the whole vocabulary (koala's engine reads the file and drafts
over the subset). Served as transformers' `assistant_model`, or a draft model in vLLM and SGLang.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from koala.models.vocab import DRAFT_VOCAB


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def write(src, out: Path, target: str) -> dict:
    from transformers import AutoTokenizer

    model = _load(src.path)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src.path).save_pretrained(out)
    for name in (DRAFT_VOCAB, "koala.json"):
        if (src.path / name).exists():
            shutil.copy2(src.path / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    return {"architecture": cfg.get("architectures", ["?"])[0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "draft_vocab_size": src.info.get("draft_vocab_size", 0)}


def check(src, out: Path, target: str) -> dict:
    from transformers import AutoTokenizer

    from koala.export import compare_causal_lms, probe_ids

    ids = probe_ids(AutoTokenizer.from_pretrained(out))
    return {**compare_causal_lms("hf", _load(src.path), _load(out), ids, atol=1e-6),
            "loaded_with": "transformers AutoModelForCausalLM"}
