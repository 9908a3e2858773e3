"""The compute dtype of teacher forcing, sampling and training: bfloat16 autocast where this machine's matrix units
run it faster than float32, float32 elsewhere.

A CPU with AMX (`amx_bf16` in /proc/cpuinfo) runs bf16 GEMMs several times faster than fp32; one without it (most AMD
EPYCs, older Xeons) may run them slower. So `compute_dtype: auto` measures bf16 against fp32 GEMM throughput at the
shapes a step of the target spends its time in, once per machine (CPU model and flags, torch version, threads,
width), caches the verdict under $KOALA_CACHE/calibration beside the decode-cost curve, and chooses bf16 only where
it measured at least `MIN_SPEEDUP` times faster. CUDA GPUs with bf16 support always take bf16.

Weights and optimizer state stay float32 (autocast casts the GEMM inputs only), so a drafter trained under bf16 is
saved and served exactly as one trained in float32. `KOALA_COMPUTE_DTYPE=float32|bfloat16` forces either path on any
machine (tests, comparisons); it overrides the config.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from koala.errors import KoalaError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ENV = "KOALA_COMPUTE_DTYPE"
# bf16 must beat fp32 by this much on the GEMMs: autocast's casts and the fp32 parts of a step (norms, softmax, the
# optimizer) take back part of the gain, so a GEMM that is merely as fast makes the whole step slower
MIN_SPEEDUP = 1.25
MATRIX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


@dataclass(frozen=True)
class ComputeDtype:
    """What a stage computes in and why: `name` is float32 or bfloat16 (or, with `autocast_on` False, the dtype the
    weights are stored in); `speedup` is bf16's measured GEMM throughput over fp32's (None when not measured)."""

    name: str
    reason: str
    speedup: float | None = None
    autocast_on: bool = True  # False: the weights are stored in `name` already (nothing to cast)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.name)

    @property
    def is_bf16(self) -> bool:
        return self.name == "bfloat16"

    def autocast(self, device: str | torch.device):
        """A bf16 autocast region on `device`'s type, or nothing in float32."""
        if not (self.is_bf16 and self.autocast_on):
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def describe(self, what: str) -> str:
        """`[teacher forcing: bfloat16 autocast, AMX: 3.6x fp32]`: what every command prints before it works."""
        how = self.name if not self.autocast_on else "bfloat16 autocast" if self.is_bf16 else "float32"
        return f"[{what}: {how}, {self.reason}]"

    def to_dict(self) -> dict:
        return asdict(self)


_announced: set[str] = set()


def announce(compute: ComputeDtype, what: str) -> None:
    """Print `compute.describe(what)` to stderr, once per process and message (a stage runs many shards or steps)."""
    announce_line(compute.describe(what))


def announce_line(line: str) -> None:
    """Print a choice's line to stderr, once per process."""
    import sys

    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    """The CPU's matrix-unit and vector flags koala's dtype choice depends on (for every bench JSON)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in MATRIX_FLAGS if x in have]
    except OSError:
        pass
    return []


def _unit(flags: list[str]) -> str:
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 matrix unit"


def gemm_shapes(hidden: int, intermediate: int, vocab: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the GEMMs a teacher-forcing or training step spends its time in: the MLP's up projection, the
    attention's square ones and a (draft-)vocabulary head, over 2048 tokens."""
    return [(2048, hidden, intermediate), (2048, hidden, hidden), (2048, hidden, min(vocab, 8192))]


def _time_linear(x: torch.Tensor, w: torch.Tensor, reps: int) -> float:
    torch.nn.functional.linear(x, w)  # warm-up: the first call packs weights and picks a kernel
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def measure_speedup(shapes: list[tuple[int, int, int]], reps: int = 5) -> dict:
    """bf16 over fp32 GEMM throughput on this CPU at `shapes`: {"speedup": geometric mean, "by_shape": [...]}."""
    g = torch.Generator().manual_seed(0)
    by_shape, log_sum = [], 0.0
    for m, k, n in shapes:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        t32 = _time_linear(x, w, reps)
        t16 = _time_linear(x.bfloat16(), w.bfloat16(), reps)
        flops = 2 * m * k * n
        by_shape.append({"shape": [m, k, n], "fp32_gflops": round(flops / t32 / 1e9, 1),
                         "bf16_gflops": round(flops / t16 / 1e9, 1), "ratio": round(t32 / t16, 3)})
        log_sum += math.log(t32 / t16)
    return {"speedup": round(math.exp(log_sum / len(shapes)), 3), "by_shape": by_shape}


def _cache_key(shapes) -> dict:
    from koala.threads import cpu_model

    return {"what": "compute_dtype", "cpu": cpu_model(), "flags": cpu_flags(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "shapes": [list(s) for s in shapes]}


def cache_path(shapes):
    from koala.assets import cache_dir

    from koala.io import digest

    key = _cache_key(shapes)
    return cache_dir() / "calibration" / f"dtype-{digest(key)}.json", key


def cpu_speedup(shapes: list[tuple[int, int, int]], refresh: bool = False) -> dict:
    """bf16's measured GEMM speed-up on this CPU, from the cache or measured now (a few seconds) and cached."""
    from koala.io import cached_json

    path, key = cache_path(shapes)
    return cached_json(path, lambda: {**key, **measure_speedup(shapes)},
                       lambda d: {**d, "speedup": float(d["speedup"])}, refresh)


def resolve(setting: str = "auto", device: str | torch.device = "cpu", hidden: int = 576, intermediate: int = 1536,
            vocab: int = 8192) -> ComputeDtype:
    """The compute dtype for work on `device` with a model of this width.

    Args:
        setting: auto (measure), float32 or bfloat16 (the config's `compute_dtype`); $KOALA_COMPUTE_DTYPE overrides it.
        hidden, intermediate, vocab: the model's widths, for the GEMM shapes measured.

    Raises:
        KoalaError: a setting or $KOALA_COMPUTE_DTYPE that is none of auto, float32, bfloat16.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in COMPUTE_DTYPES:
        raise KoalaError(f"{ENV}={forced!r} is not one of {', '.join(COMPUTE_DTYPES)}: set it to one, or unset it")
    if setting not in COMPUTE_DTYPES:
        raise KoalaError(f"compute_dtype {setting!r} is not one of {', '.join(COMPUTE_DTYPES)}: "
                         "use --compute-dtype auto, float32 or bfloat16")
    dev = torch.device(device)
    if forced in ("float32", "bfloat16"):
        return ComputeDtype(forced, f"forced by {ENV}")
    if setting != "auto":
        return ComputeDtype(setting, "set by compute_dtype")
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ComputeDtype("bfloat16" if ok else "float32", f"CUDA {'with' if ok else 'without'} bf16")
    if dev.type != "cpu":
        return ComputeDtype("float32", f"{dev.type}: not measured")
    m = cpu_speedup(gemm_shapes(hidden, intermediate, vocab))
    s, unit = m["speedup"], _unit(cpu_flags())
    if s >= MIN_SPEEDUP:
        return ComputeDtype("bfloat16", f"{unit}: bf16 GEMMs {s:.1f}x fp32", s)
    return ComputeDtype("float32", f"{unit}: bf16 GEMMs {s:.2f}x fp32, below {MIN_SPEEDUP}x", s)


def for_model(setting: str, model: torch.nn.Module) -> ComputeDtype:
    """`resolve` at a Hugging Face model's widths and device; a model stored in bf16/fp16 computes in its own dtype."""
    p = next(model.parameters())
    if p.dtype != torch.float32:
        name = str(p.dtype).removeprefix("torch.")
        return ComputeDtype(name, f"the weights are stored in {name}", autocast_on=False)
    c = model.config
    return resolve(setting, p.device, c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size),
                   c.vocab_size)


def decode_dtype(setting: str, model: torch.nn.Module) -> ComputeDtype:
    """The dtype an evaluation decodes a target in (`eval.dtype`): the target's own (`target`), a given one, or
    `auto`: bfloat16 where this machine's matrix units measure bf16 GEMMs at least MIN_SPEEDUP times faster at the
    target's widths (the measurement `compute_dtype: auto` uses, cached per machine), else the target's own."""
    own = str(next(model.parameters()).dtype).removeprefix("torch.")
    if setting == "target":
        return ComputeDtype(own, "the target's own dtype", autocast_on=False)
    if setting != "auto":
        return ComputeDtype(setting, "set by eval.dtype", autocast_on=False)
    c = for_model("auto", model)
    return ComputeDtype(c.name if c.is_bf16 else own, c.reason, c.speedup, autocast_on=False)
