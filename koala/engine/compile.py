"""Compiled decode steps (gpt-fast's pattern): inductor with frozen weights on a CPU, CUDA graphs on CUDA.

On CUDA the default mode is `reduce-overhead`: inductor's kernels captured as CUDA graphs (cudagraph trees), one
graph per step shape, i.e. per verify width and per sampler batch. Nothing in a step synchronises with the host
(the cache is written by position, `index_copy_` or a batched sampler's per-row `index_put_`; the mask is built from
the input positions on the device; the rejection rule runs on the device after it), so a replay is one launch. A
replay reuses its output memory, so each call marks a new step and returns copies of its outputs (logits of a few
tokens: a negligible copy) that later steps cannot overwrite.

A step of a few tokens is one graph per width with static shapes: the whole static KV cache is attended to under a
mask built from the input positions, so nothing depends on how long the sequence is. On a CPU inductor's
max-autotune picks, per GEMM shape, between MKL and its own small-M micro-kernels, which read the weights once for
all rows: verifying gamma + 1 tokens then costs little more than one (bench/decode.py prints the curve). Compiled
artifacts are cached on disk under $KOALA_CACHE/inductor, so a second run, or another process, loads them instead
of compiling again; `compile_seconds()` reports the time spent compiling apart from decoding.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import torch

from koala.errors import KoalaError

MAX_STEP_WIDTH = 32  # steps of at most this many tokens (a chain's or a draft tree's) run compiled; a prefill eager
_compile_s = 0.0


def compile_seconds() -> float:
    """Seconds spent so far in this process compiling (the first call of each new step shape)."""
    return _compile_s


def configure_inductor(device: torch.device) -> None:
    """Inductor's on-disk caches under $KOALA_CACHE/inductor; frozen weights (a CPU prerequisite of the fast GEMMs)."""
    from koala.assets import cache_dir as cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    import torch._dynamo.config as dc
    import torch._inductor.config as ic

    dc.cache_size_limit = max(dc.cache_size_limit, 64)  # one graph per (width, outputs): allow them all
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's own, at autotuning
    if device.type == "cpu":
        ic.freezing = True  # weights become constants: inductor pre-packs them for its GEMM micro-kernels
        ic.max_autotune_report_choices_stats = False  # autotuning prints a table per GEMM shape otherwise
        ic.autotune_num_choices_displayed = 0


def compiled_by_default(device: str) -> bool:
    """Whether a batched sampler's step is compiled when not told: on CUDA (one CUDA graph replayed for a whole
    shard); not on a CPU, where compiling a batch step costs minutes of autotuning for no measured gain."""
    return device.startswith("cuda")


def default_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA; on a CPU inductor's autotuned GEMMs (graphs would be skipped there anyway)."""
    return "reduce-overhead" if device.type == "cuda" else "max-autotune-no-cudagraphs"


class CompiledStep:
    """A model's forward compiled as two graphs: one token (plain decoding, draft steps) and 2..MAX_STEP_WIDTH tokens.

    The second graph has a symbolic width, so every verify width (and the calibration of the cost by width) shares
    one compilation (on CUDA each width is then captured as its own CUDA graph); everything else (the cache, the
    weights, a batched sampler's rows) is static. Each first call is timed as compile time.
    """

    def __init__(self, fn: Callable, device: torch.device, mode: str | None = None):
        configure_inductor(device)
        self.mode = mode or default_mode(device)
        self.graphs = self.mode in ("reduce-overhead", "max-autotune")  # modes that capture CUDA graphs
        self.fn = torch.compile(fn, mode=self.mode, fullgraph=True)

    def __call__(self, idx, input_pos, *, embeds=None, hidden=False, logits=True, tree=None):
        global _compile_s
        # Canonical inputs: without them each new buffer length, or a tree's tokens after a chain's, would compile
        # the step again.
        idx = None if idx is None else _canonical(idx)
        embeds = None if embeds is None else _canonical(embeds)
        input_pos = _canonical(input_pos)
        x = idx if embeds is None else embeds
        if x.shape[1] > 1:  # one graph for every width from 2 up: mark the width symbolic before dynamo sees it
            torch._dynamo.mark_dynamic(x, 1, min=2, max=MAX_STEP_WIDTH)
            torch._dynamo.mark_dynamic(input_pos, input_pos.dim() - 1, min=2, max=MAX_STEP_WIDTH)
            if tree is not None:
                tree = (_canonical(tree[0]), _canonical(tree[1]))
                torch._dynamo.mark_dynamic(tree[0], 0, min=2, max=MAX_STEP_WIDTH)
                torch._dynamo.mark_dynamic(tree[1], 0, min=2, max=MAX_STEP_WIDTH)
        graphs = _graphs()
        t = time.perf_counter()
        if self.graphs:  # a new step: the previous replay's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self.fn(idx, input_pos, embeds=embeds, hidden=hidden, logits=logits, tree=tree)
            if self.graphs:
                out = tuple(None if o is None else o.clone() for o in out)
        except _COMPILE_ERRORS as e:  # no C++ toolchain, a backend failure: one line, and the way around it
            inner = getattr(e, "inner_exception", None) or e
            first = (str(inner).strip().splitlines() or [""])[0][:200]
            raise KoalaError(f"the compiled engine could not be built ({type(inner).__name__}: {first}): run with "
                             "--no-compile (eval.compile: false)") from e
        if _graphs() != graphs:  # this call compiled (a first call, or a recompilation): not decode time
            _compile_s += time.perf_counter() - t
        return out


def _compile_errors() -> tuple[type, ...]:
    import torch._dynamo.exc as de

    errors: list[type] = [de.BackendCompilerFailed]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


_COMPILE_ERRORS = _compile_errors()


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy (a step's inputs are a few tokens or rows): dynamo guards on strides and on storage
    offsets, and a slice of the sequence buffer, a tree's tokens and a fresh tensor differ in both."""
    return t.clone(memory_format=torch.contiguous_format)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
