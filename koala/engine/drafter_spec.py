"""Drafter specs (`--drafter`, `eval.drafter`): a string parsed once into a typed object, then checked or loaded.

    truncate:N      the target's first N layers (shares its weights)
    ngram[:N]       prompt lookup over n-grams of up to N tokens (default 3)
    heads:PATH      Medusa or EAGLE heads trained by `koala heads`
    lookup+SPEC     prompt lookup first, SPEC where the context has no match
    anything else   a causal LM: a koala drafter directory, a model directory, a Hugging Face id or a .gguf file

`parse_drafter_spec` rejects a malformed spec with one line naming it and the fix; `check_drafter_spec` also checks
the files it names without loading anything (the CLI calls it before the target loads); `load_drafter` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from koala.engine.drafters import (DraftVocab, Drafter, LookupFirstDrafter, ModelDrafter, PromptLookupDrafter,
                                   load_heads_drafter)
from koala.engine.model import Transformer
from koala.config import HEAD_KINDS as HEAD_DRAFTER_KINDS
from koala.errors import KoalaError
from koala.models.vocab import load_draft_vocab


@dataclass(frozen=True)
class Truncate:
    layers: int


@dataclass(frozen=True)
class NGram:
    max_ngram: int = 3


@dataclass(frozen=True)
class Heads:
    path: Path


@dataclass(frozen=True)
class CausalLM:
    source: str  # a koala drafter or model directory, a Hugging Face id, a .gguf file, or a koala target name


@dataclass(frozen=True)
class LookupFirst:
    inner: "Truncate | Heads | CausalLM"


DrafterSpec = Truncate | NGram | Heads | CausalLM | LookupFirst


def spec_of_dir(path: str | Path) -> str:
    """The `--drafter` spec of a saved drafter directory: `heads:PATH` for draft heads, the path otherwise."""
    return f"heads:{path}" if (Path(path) / "heads.json").exists() else str(path)


def parse_drafter_spec(spec: str) -> DrafterSpec:
    """The typed form of a spec string.

    Raises:
        KoalaError: a malformed spec (truncate:x, ngram:0, heads: without a path, lookup+ngram), naming the fix.
    """
    if spec.startswith("lookup+"):
        inner = parse_drafter_spec(spec[len("lookup+"):])
        if isinstance(inner, (NGram, LookupFirst)):
            raise KoalaError(f"drafter {spec!r}: lookup+ goes in front of a trained drafter, e.g. lookup+truncate:2 "
                             "or lookup+heads:PATH (ngram alone already is prompt lookup)")
        return LookupFirst(inner)
    kind, sep, arg = spec.partition(":")
    if kind == "truncate" and sep:
        if not arg.isdigit() or int(arg) < 1:
            raise KoalaError(f"drafter {spec!r}: write truncate:N with N >= 1 a number of layers, e.g. truncate:2")
        return Truncate(int(arg))
    if kind == "ngram":
        if sep and (not arg.isdigit() or int(arg) < 1):
            raise KoalaError(f"drafter {spec!r}: write ngram:N with N >= 1 the longest n-gram to look up, e.g. ngram:3")
        return NGram(int(arg) if sep else 3)
    if kind == "heads" and sep:
        if not arg:
            raise KoalaError(f"drafter {spec!r}: write heads:PATH with PATH the heads directory `koala heads` wrote")
        return Heads(Path(arg))
    if not spec.strip():
        raise KoalaError("drafter '': give truncate:N, ngram[:N], heads:PATH, lookup+SPEC or a causal LM")
    return CausalLM(spec)


def check_drafter_spec(spec: str | DrafterSpec) -> DrafterSpec:
    """Parse a spec and check the files it names without loading anything: they exist and are whole (safetensors
    headers against file sizes, a .gguf against its .sha256, the draft vocabulary its metadata promises).

    Raises:
        KoalaError: naming the spec and the fix.
    """
    from koala.io import check_safetensors
    from koala.models.heads import HEADS_JSON, HEADS_WEIGHTS
    from koala.targets import _resolve

    d = parse_drafter_spec(spec) if isinstance(spec, str) else spec
    if isinstance(d, LookupFirst):
        check_drafter_spec(d.inner)
    elif isinstance(d, Heads):
        if not (d.path / HEADS_JSON).exists() or not (d.path / HEADS_WEIGHTS).exists():
            raise KoalaError(f"drafter 'heads:{d.path}': {d.path} holds no draft heads ({HEADS_JSON} + "
                             f"{HEADS_WEIGHTS}): train them with `koala heads --out DIR` and pass heads:DIR/heads")
        info = _json_file(d.path / HEADS_JSON, f"heads:{d.path}")
        missing = [k for k in ("kind", "layers", "hidden_size", "vocab_size") if k not in info]
        if missing or info.get("kind") not in HEAD_DRAFTER_KINDS:
            raise KoalaError(f"drafter 'heads:{d.path}': {HEADS_JSON} lacks {', '.join(missing) or 'a known kind'}: "
                             "it was not written by `koala heads`; train the heads again")
        check_safetensors(d.path / HEADS_WEIGHTS)
        load_draft_vocab(d.path)
    elif isinstance(d, CausalLM):
        _resolve(d.source, role="drafter")  # unknown names, missing files, directories without weights, a bad .gguf
        p = Path(d.source)
        if p.is_dir():
            for name in ("config.json", "koala.json"):
                if (p / name).exists():
                    _json_file(p / name, d.source)
            for f in sorted(p.glob("*.safetensors")):
                check_safetensors(f)
            load_draft_vocab(p)
    return d


def _json_file(path: Path, spec: str) -> dict:
    """A drafter's JSON file as a dict, or a one-line error naming it (cut short, not JSON, unreadable)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KoalaError(f"drafter {spec!r}: {path} is unreadable or not valid JSON ({type(e).__name__}): the file is "
                         "damaged; copy or train the drafter again") from None
    if not isinstance(data, dict):
        raise KoalaError(f"drafter {spec!r}: {path} holds a JSON {type(data).__name__}, not an object: the file is "
                         "damaged; copy or train the drafter again")
    return data


def load_drafter(spec: str | DrafterSpec, target: Transformer, dtype: str = "float32", device: str = "cpu") -> Drafter:
    """A drafter from its spec, on the target's engine model (truncate and heads share its weights).

    Raises:
        KoalaError: a malformed spec or a drafter that cannot be loaded.
    """
    d = check_drafter_spec(spec)
    if isinstance(d, LookupFirst):
        return LookupFirstDrafter(load_drafter(d.inner, target, dtype, device))
    if isinstance(d, Truncate):
        return ModelDrafter(target.truncated(d.layers), name=f"truncate:{d.layers}")
    if isinstance(d, NGram):
        return PromptLookupDrafter(max_ngram=d.max_ngram, vocab_size=target.args.vocab_size)
    if isinstance(d, Heads):
        return load_heads_drafter(str(d.path), target)
    from koala.targets import load_target

    t = load_target(d.source, dtype=dtype, device=device, role="drafter")
    engine = Transformer(t.model)
    dv = DraftVocab.load(d.source, t.model.lm_head, engine.args.vocab_size) if Path(d.source).is_dir() else None
    m = ModelDrafter(engine, name=d.source, draft_vocab=dv)
    m.source = d.source  # where its stored metrics live (koala.engine.calibrate.stored_acceptance)
    return m
