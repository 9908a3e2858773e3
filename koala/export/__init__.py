"""Drafters where users serve them: `koala export DRAFTER --format hf|gguf|speculators|sglang|medusa --out DIR`.

Every export is checked by a round trip before it is put in place: the written files are loaded back with the
format's own loader (transformers for hf, transformers' GGUF reader for gguf, the Medusa layout for medusa, the
speculators package's classes, or its published schema, for speculators) and must draft what koala's drafter drafts:
logits within float tolerance on a fixed batch, and the same greedy tokens. An export that fails its check is never
written; one that passes carries `koala_export.json` (source, format, digests, the check's figures).

| format      | drafter kind             | served by                                                       |
|-------------|--------------------------|-----------------------------------------------------------------|
| hf          | independent (koala distill) | transformers `assistant_model`, vLLM / SGLang draft model    |
| gguf        | independent              | llama.cpp `--model-draft` (`-md`)                                 |
| speculators | EAGLE-3 heads, any K (koala heads --kind eagle3) | vLLM (`--speculative-config`), the speculators package 0.9.0 |
| speculators | EAGLE heads, K = 1 (koala heads --kind eagle) | the speculators package 0.4.0.1 (vLLM reads eagle3 only) |
| sglang      | EAGLE-3 heads, K = 1     | SGLang (`--speculative-algorithm EAGLE3`), SpecForge's LlamaForCausalLMEagle3 |
| medusa      | Medusa heads             | the Medusa repo, vLLM's medusa method, TensorRT-LLM              |
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from koala.errors import KoalaError

FORMATS = ("hf", "gguf", "speculators", "sglang", "medusa")
EXPORT_JSON = "koala_export.json"
KIND_OF_FORMAT = {"hf": ("draft_model",), "gguf": ("draft_model",), "speculators": ("eagle", "eagle3"),
                  "sglang": ("eagle3",), "medusa": ("medusa",)}


@dataclass(frozen=True)
class DrafterSource:
    """A koala drafter on disk: an independent drafter (koala.json) or draft heads (heads.json)."""

    path: Path
    kind: str  # draft_model, medusa, eagle or eagle3
    info: dict

    @property
    def target_name(self) -> str | None:
        return (self.info.get("target") or {}).get("name")


def open_drafter(spec: str | Path) -> DrafterSource:
    """A drafter directory, or `heads:PATH`, as a DrafterSource.

    Raises:
        KoalaError: no such directory, or one that holds no koala drafter.
    """
    p = Path(str(spec).removeprefix("heads:"))
    if not p.is_dir():
        raise KoalaError(f"drafter {spec}: no such directory: give a drafter directory (koala distill writes "
                         "OUT/drafter), heads:PATH, or a registry reference models:/NAME@champion")
    if (p / "heads.json").exists():
        info = json.loads((p / "heads.json").read_text())
        return DrafterSource(p, info["kind"], info)
    if (p / "koala.json").exists():
        return DrafterSource(p, "draft_model", json.loads((p / "koala.json").read_text()))
    raise KoalaError(f"drafter {spec} holds neither koala.json (an independent drafter) nor heads.json (draft "
                     "heads): point it at what koala distill or koala heads wrote")


def check_format(fmt: str, src: DrafterSource) -> None:
    """The format exists and takes this kind of drafter.

    Raises:
        KoalaError: naming the format that does take it.
    """
    if fmt not in FORMATS:
        raise KoalaError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if src.kind not in KIND_OF_FORMAT[fmt]:
        fits = [f for f, kinds in KIND_OF_FORMAT.items() if src.kind in kinds]
        raise KoalaError(f"--format {fmt} takes {' or '.join(KIND_OF_FORMAT[fmt])} drafters, and {src.path} holds "
                         f"{src.kind}: use --format {' or '.join(fits)}")


def check_out(out: str | Path, src: DrafterSource) -> None:
    """`--out` is new, or an earlier export (it is replaced whole): never the drafter, a folder around it, or a
    folder of something else.

    Raises:
        KoalaError: naming --out and the fix.
    """
    o, s = Path(out).resolve(), src.path.resolve()
    if o == s or o in s.parents:
        raise KoalaError(f"--out {out} holds the drafter being exported ({src.path}): choose another directory")
    if o.exists() and not (o.is_dir() and (o / EXPORT_JSON).exists()):
        raise KoalaError(f"--out {out} exists and is not an earlier koala export (no {EXPORT_JSON}), so it would be "
                         "replaced: choose a new directory")


def export(src: DrafterSource, fmt: str, out: str | Path, target_spec: str | None = None,
           check: bool = True, source_ref: str | None = None) -> dict:
    """Write `src` in format `fmt` to `out` (replaced whole, never half-written), checked by a round trip.

    Args:
        target_spec: the target the drafter serves (default: the one its koala.json / heads.json names); heads
            formats take its LM head and embeddings, gguf its tokenizer.
        check: load the export back and compare it with koala's drafter before putting it in place.

    Returns:
        What `koala_export.json` holds: format, source, files, and the round trip's figures.

    Raises:
        KoalaError: a format that does not take this drafter, an --out that is not new or an earlier export, a
            target that cannot be loaded, a failed round trip.
    """
    from koala.io import atomic_dir
    from koala.training.checkpoints import weights_digest

    check_format(fmt, src)
    check_out(out, src)
    target = target_spec or src.target_name
    if target is None:
        raise KoalaError(f"{src.path} does not name its target: pass --target")
    # each format's write(src, dir, target) and check(...); EAGLE-3 heads are speculators 0.9.0's `eagle3`
    name = "speculators_eagle3" if fmt == "speculators" and src.kind == "eagle3" else fmt
    module = importlib.import_module(f"koala.export.{name}")
    with atomic_dir(out) as tmp:
        try:
            manifest = module.write(src, tmp, target)
            manifest["round_trip"] = module.check(src, tmp, target) if check else None
        except (KoalaError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a drafter the format's writer or loader cannot take
            why = (str(e).strip().splitlines() or [""])[0][:200]
            raise KoalaError(f"the {fmt} export of {source_ref or src.path} failed ({type(e).__name__}: {why}): "
                             "nothing was written; check that the drafter loads with koala eval") from None
        manifest.update(format=fmt, source=source_ref or str(src.path), source_kind=src.kind, target=target,
                        source_weights_sha256=weights_digest(src.path),
                        files=sorted(f.name for f in tmp.iterdir()))
        (tmp / EXPORT_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def require(ok: bool, fmt: str, what: str) -> None:
    """A round-trip check: a failure is one line naming the format and what differed; nothing is written."""
    if not ok:
        raise KoalaError(f"the {fmt} export failed its round trip ({what}): nothing was written; please report it "
                         "with the drafter's koala.json / heads.json")


@functools.lru_cache(maxsize=1)
def load_target(spec: str):
    """The target in float32 on the CPU, loaded once for an export's write and its check."""
    from koala.targets import load_target as load

    return load(spec, dtype="float32")


def verifier_name(t) -> str:
    """What a loader can fetch the target by: its hub id or directory; a GGUF target's name (give the loader the
    verifier itself: `verifier_attachment_mode="detached"` and its embeddings, as the round trip does)."""
    return t.info.name if t.info.source.endswith(".gguf") else t.info.source


PROBE_CHATS = (  # a fixed batch for the round trips: varied, and none of them an evaluation prompt
    "Write a short note to a neighbour asking them to water the plants while I am away.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
)


def probe_ids(tokenizer, device="cpu"):
    """(2, T) token ids of the probe chats, cut to the shorter one's length."""
    import torch

    from koala.targets import encode_chat

    rows = [encode_chat(tokenizer, [{"role": "user", "content": c}]) for c in PROBE_CHATS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], device=device)


def compare_causal_lms(fmt: str, ours, theirs, ids, new_tokens: int = 16, atol: float = 1e-3) -> dict:
    """Two causal LMs (koala's drafter and its export loaded back) agree on `ids`: logits within `atol` (relative
    to the logits' scale) and the same greedy continuation of each row.

    Raises:
        KoalaError: they differ (via `require`).
    """
    import torch

    with torch.no_grad():
        a = ours(ids).logits.float()
        b = theirs(ids).logits.float()
        diff = float((a - b).abs().max())
        scale = float(a.abs().max())
        require(diff <= atol * max(1.0, scale), fmt, f"logits differ by {diff:.3g} at scale {scale:.3g}")
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
        greedy = [m.generate(ids, **kw)[:, ids.shape[1]:] for m in (ours, theirs)]
        require(torch.equal(*greedy), fmt, "greedy continuations differ")
    return {"max_abs_logit_diff": diff, "logit_scale": scale, "greedy_tokens_identical": int(greedy[0].numel()),
            "probe_tokens": int(ids.numel())}
