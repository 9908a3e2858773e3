"""Load a target chat LLM (the default GGUF, a Hugging Face id, a local directory or a .gguf path) with its facts.

The chat template is applied here and nowhere else (`encode_chat`), so sampling, evaluation and training all see the
target's prompts exactly as the target would.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from koala import assets
from koala.errors import KoalaError
from koala.io import file_lock, sha256_file

DEFAULT_TARGET = "smollm2-135m-instruct"
KNOWN_TARGETS = {DEFAULT_TARGET: DEFAULT_TARGET}  # koala name -> asset name of its GGUF
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TargetInfo:
    name: str
    source: str  # the resolved path or hub id
    params: int
    vocab_size: int
    num_layers: int
    max_context: int
    dtype: str
    device: str
    content_hash: str  # sha256 of the weights file(s): two targets with the same hash are the same model
    tokenizer_hash: str  # sha256 of the vocabulary and chat template
    chat_template_hash: str  # sha256 of the chat template alone

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    model: torch.nn.Module
    tokenizer: object
    info: TargetInfo


def target_facts(target: Target) -> dict:
    """What a dataset or a drafter records of the target it was made with (checked again when read)."""
    i = target.info
    return {"name": i.name, "content_hash": i.content_hash, "tokenizer_hash": i.tokenizer_hash,
            "chat_template_hash": i.chat_template_hash, "vocab_size": i.vocab_size}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KoalaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


FIX = {"target": "check the path, or re-fetch the default with `koala assets fetch --force`",
       "drafter": "point --drafter at a drafter directory (koala distill writes OUT/drafter), or use truncate:N, "
                  "ngram[:N] or heads:PATH"}


def _resolve(spec: str, role: str = "target") -> tuple[str, Path | str, str | None]:
    """Turn a target (or drafter model) spec into (name, directory-or-hub-id, gguf filename or None)."""
    if spec in KNOWN_TARGETS:
        gguf = assets.path(KNOWN_TARGETS[spec])
        return spec, gguf.parent, gguf.name
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise KoalaError(f"{role} GGUF {p} does not exist: {FIX[role]}")
        _verify_sidecar(p)
        return p.stem, p.parent, p.name
    if p.is_dir():
        if not any(next(p.glob(g), None) for g in WEIGHT_GLOBS):
            raise KoalaError(f"{role} directory {p} holds no weights (*.safetensors, *.bin or *.gguf): "
                             + (FIX[role] if role != "target" else "point --target at a directory written by "
                                "save_pretrained"))
        return p.name, p, None
    if spec.count("/") == 1 and not p.exists():
        return spec, spec, None  # a Hugging Face hub id
    if role != "target":
        raise KoalaError(f"unknown {role} {spec!r}: use truncate:N, ngram[:N], heads:PATH, lookup+SPEC, a drafter "
                         "directory, a .gguf file or a Hugging Face id (org/name)")
    raise KoalaError(
        f"unknown target {spec!r}: use {', '.join(KNOWN_TARGETS)}, a Hugging Face id (org/name), "
        "a local model directory or a .gguf file"
    )


def _verify_sidecar(file: Path) -> None:
    """A .gguf given beside its .sha256 (as koala.assets writes it) must still match it: a truncated copy is refused
    rather than loaded (or hashed by its sidecar as if whole). Hashed once per process and file version."""
    sidecar = file.with_name(file.name + ".sha256")
    if not sidecar.exists():
        return
    st = file.stat()
    if not _matches_sidecar(str(file.resolve()), st.st_size, st.st_mtime_ns, sidecar.read_text().strip()):
        raise KoalaError(f"{file} does not match {sidecar.name} (truncated or changed): copy it again, or "
                         "`koala assets fetch --force` for the default")


def _content_hash(source: Path | str, gguf: str | None) -> str:
    if gguf is not None:
        file = Path(source) / gguf
        sidecar = file.with_name(file.name + ".sha256")  # written by koala.assets after verification
        return sidecar.read_text().strip() if sidecar.exists() else sha256_file(file)
    d = Path(source)
    if not d.is_dir():
        return hashlib.sha256(str(source).encode()).hexdigest()  # hub id: the revision is what names the weights
    h = hashlib.sha256()
    for g in WEIGHT_GLOBS:
        for f in sorted(d.glob(g)):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary, special tokens and chat template: equal hashes mean the same token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _converted_dir(content_hash: str) -> Path:
    return assets.cache_dir() / "converted" / content_hash[:16]


def _load_hf(source, gguf, dtype, trust_remote_code, role: str = "target"):
    if gguf is not None:
        # Dequantising a GGUF takes ~30 s on a small CPU; the result is cached once as safetensors, by one process
        # while the others wait for it (the workers of one machine starting together).
        conv = _converted_dir(_content_hash(source, gguf))
        if not (conv / "config.json").exists():
            with _lock_if_writable(conv.parent / f".{conv.name}.lock"):
                if not (conv / "config.json").exists():
                    model, tok = _from_pretrained(source, gguf, dtype, trust_remote_code, role)
                    _save_converted(model, tok, conv)
                    return model, tok
        source, gguf = conv, None
    return _from_pretrained(source, gguf, dtype, trust_remote_code, role)


def _lock_if_writable(path: Path) -> contextlib.ExitStack:
    """`file_lock`, or no lock where the cache cannot hold one (read-only): each process then converts for itself."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(file_lock(path))
    except OSError:
        pass
    return stack


def _from_pretrained(source, gguf, dtype, trust_remote_code, role: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf) if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=trust_remote_code, **kw
        )
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' own error for a damaged file ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KoalaError(f"could not load {role} {source}{'/' + gguf if gguf else ''} ({first[:200]}): "
                         f"{FIX[role]}") from e
    return model, tok


def _save_converted(model, tok, conv: Path) -> None:
    """Write the dequantised model once, atomically (a directory renamed into place)."""
    import shutil
    import tempfile

    tmp = None
    try:
        conv.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".conv-", dir=conv.parent))
        # save_pretrained refuses a GGUF-quantised model; the weights are plain tensors once dequantised.
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head copy
        tok.save_pretrained(tmp)
        tmp.rename(conv)
    except OSError:
        pass  # a full disk or a read-only cache: the model loaded from the GGUF still works
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=32)
def _matches_sidecar(path: str, size: int, mtime_ns: int, expected: str) -> bool:
    return sha256_file(path) == expected


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and CUDA only where there is a CUDA GPU."""
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise KoalaError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise KoalaError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False): "
                         "use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise KoalaError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s): use cuda:0"
                         f"..cuda:{torch.cuda.device_count() - 1}")


def load_target(
    spec: str = DEFAULT_TARGET,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    role: str = "target",
) -> Target:
    """Load a target model and tokenizer.

    Args:
        spec: `smollm2-135m-instruct` (the embedded default), a Hugging Face id, a model directory or a .gguf path.
        dtype: float32, bfloat16 or float16.
        device: cpu, cuda or cuda:N.
        trust_remote_code: run model code shipped with the checkpoint; off unless the user asks.
        role: "target", or "drafter" when a drafter model is loaded (error messages then give a drafter's fixes).

    Returns:
        A Target with the model in eval mode, its tokenizer and a TargetInfo.

    Raises:
        KoalaError: unknown name, missing or corrupt file, directory without weights.
    """
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    name, source, gguf = _resolve(spec, role)
    model, tok = _load_hf(source, gguf, torch_dtype, trust_remote_code, role)
    model = model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = model.config
    info = TargetInfo(
        name=name,
        source=str(Path(source) / gguf) if gguf else str(source),
        params=sum(p.numel() for p in model.parameters()),
        vocab_size=int(cfg.vocab_size),
        num_layers=int(cfg.num_hidden_layers),
        max_context=int(getattr(cfg, "max_position_embeddings", 2048)),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(device),
        content_hash=_content_hash(source, gguf),
        tokenizer_hash=tokenizer_hash(tok),
        chat_template_hash=hashlib.sha256(str(getattr(tok, "chat_template", "") or "").encode()).hexdigest(),
    )
    return Target(model, tok, info)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat as the target sees it: the one place koala applies the chat template."""
    if not messages:
        raise KoalaError("empty prompt: a chat needs at least one message")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
    return tokenizer(text)["input_ids"]
