"""koala's decode GEMM on a CPU with AVX-512: a verify step of 8 tokens for little more than a step of one.

A decode or verify step of a small target on a CPU reads every weight once; what it costs beyond that is how well
its GEMMs of a few rows keep the memory busy. torch's kernels (MKL's, oneDNN's, inductor's autotuned micro-kernels)
cost 1.3 to 3 times more at 8 rows than at 1 on a CPU without a bf16 matrix unit, which keeps draft trees small there.
`small_gemm.cpp` streams each weight panel once for up to 8 rows, prefetching ahead, and for up to 32 rows runs
L1-sized chunks of the panel through every 8-row block in turn while the next chunk streams in, so its cost grows
slowly with the rows (bench/step_cost.py prints the curve), and its result for a row does not depend on how many
rows share the call.

`use_for(model, setting)` decides whether a target's decode steps run it: `auto` (the default) measures it against
torch's GEMM on the model's own weights at a few widths, once per machine (CPU model and flags, torch, threads,
dtype, weight shapes; cached under $KOALA_CACHE/calibration), and packs the model's linear layers
(`PackedLinear`) where it measured faster; `koala` packs them without measuring; `torch` never does.
$KOALA_GEMM overrides the setting. The kernel is built once per machine from its source into $KOALA_CACHE/kernels
(seconds, with $CXX, by default g++); a CPU without AVX-512, or a build that fails, keeps torch's GEMMs.

The packed weight is the same weight in another layout: the target decodes the same model, and speculative
decoding's output stays the target's own as it is run (its autoregressive baseline runs the same kernel).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from koala.errors import KoalaError

SOURCE = Path(__file__).with_name("small_gemm.cpp")
SETTINGS = ("auto", "koala", "torch")
ENV = "KOALA_GEMM"
MAX_ROWS = 32  # koala.engine.compile.MAX_STEP_WIDTH: a longer input (a prefill) runs torch's dense GEMM
MEASURE_WIDTHS = (1, 4, 8, 16)  # where `auto` times both GEMMs
MEASURE_ROUNDS = 3
DTYPES = (torch.float32, torch.bfloat16)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mfma", "-DNDEBUG"]
_loaded: bool | None = None  # None: not tried in this process; False: tried and unavailable
_load_lock = threading.Lock()


@dataclass(frozen=True)
class GemmChoice:
    """Which GEMM a target's decode steps run (`koala` or `torch`) and why (printed once by every command)."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"[decode GEMMs: {'koala AVX-512 kernel' if self.name == 'koala' else 'torch'}, {self.reason}]"


def unsupported() -> str | None:
    """Why this machine cannot run the kernel, or None where it can."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"a {platform.machine()} CPU, not x86-64"
    from koala.precision import cpu_flags

    if "avx512f" not in cpu_flags():
        return "no AVX-512 on this CPU"
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compiler_version() -> str:
    try:
        return subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "missing"


def _build_key() -> dict:
    from koala.threads import cpu_model

    return {"source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "torch": torch.__version__,
            "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI), "cpu": cpu_model(), "python": sys.version_info[:2],
            "compiler": _compiler_version(), "flags": FLAGS}


def library() -> Path:
    """The kernel's shared library for this machine, built once (seconds, $CXX or g++) into $KOALA_CACHE/kernels.

    Raises:
        KoalaError: the compiler is missing or fails (the message names the first error line).
    """
    from koala.assets import cache_dir
    from koala.engine.spinner import spinner
    from koala.io import atomic_path, digest, file_lock

    path = cache_dir() / "kernels" / f"small_gemm-{digest(_build_key())}.so"
    if path.exists():
        return path
    with file_lock(path.with_suffix(".lock")):
        if path.exists():  # another process built it while this one waited
            return path
        from torch.utils import cpp_extension

        with spinner("building koala's decode GEMM kernel, once for this machine"), atomic_path(path) as tmp:
            cmd = [_compiler(), *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                   *(f"-I{p}" for p in cpp_extension.include_paths()), str(SOURCE), "-o", str(tmp),
                   *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:
                raise KoalaError(f"koala's GEMM kernel could not be built ({e}): install g++, or set {ENV}=torch")
            if r.returncode != 0:
                first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
                raise KoalaError(f"koala's GEMM kernel could not be built ({first.strip()[:200]}): set {ENV}=torch")
    return path


def load() -> bool:
    """Load the kernel's ops (`torch.ops.koala.pack`, `torch.ops.koala.small_linear`) into this process, building
    them first where needed; False where this machine cannot run them or the build failed (said once on stderr)."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            _loaded = _load()
    return _loaded


def _load() -> bool:
    why = unsupported()
    if why is None:
        try:
            torch.ops.load_library(str(library()))
            torch.library.register_fake("koala::small_linear")(_fake_small_linear)
            torch.library.register_fake("koala::pack")(_fake_pack)
        except (KoalaError, OSError, RuntimeError) as e:
            why = str(e)
    if why is not None:
        print(f"[koala] decode GEMMs: torch's ({why})", file=sys.stderr, flush=True)
    return why is None


def _fake_small_linear(x, packed, n):
    return x.new_empty((x.shape[0], n))


PANEL = 48  # small_gemm.cpp's NR: output columns per packed panel


def _fake_pack(w):
    panels = -(-w.shape[0] // PANEL)
    return w.new_empty((panels, w.shape[1], PANEL))


class PackedLinear(nn.Module):
    """A linear layer whose steps of up to MAX_ROWS rows run koala's kernel on a packed copy of its weight.

    `weight` is the layer's own (a prefill, and anything that reads the weight, use it); `packed` is the same values
    in the kernel's layout, a buffer traced into compiled steps as a constant.
    """

    def __init__(self, linear: nn.Linear, store: torch.dtype | None = None, rounded: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.register_buffer("packed", torch.ops.koala.pack(w if store is None else w.to(store)))
        self.act_dtype = w.dtype  # the activations': a weight stored as bf16 (`store`) still computes in float32
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a list: not registered again as this module's parameter. `rounded`: the dense GEMM reads the weight rounded
        # to `store` as the kernel does (a copy; the layer's own weight may be shared with another model)
        self._source = [w.to(store).to(w.dtype) if rounded and store is not None else linear.weight]

    @property
    def weight(self) -> torch.Tensor:
        return self._source[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # a prefill, autocast, or a training step through the layer (the kernel has no backward): torch's dense GEMM
        if rows > MAX_ROWS or x.dtype != self.act_dtype or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.koala.small_linear(x.reshape(rows, self.in_features), self.packed, self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, koala's packed layout, "
                f"{str(self.packed.dtype).removeprefix('torch.')}")


def _linears(hf_model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every nn.Linear in the decoder layers, and the output head."""
    out = []
    for layer in hf_model.model.layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                out.append((layer.get_submodule(parent) if parent else layer, child, module))
    if isinstance(hf_model.lm_head, nn.Linear):
        out.append((hf_model, "lm_head", hf_model.lm_head))
    return out


def store_dtype(hf_model: nn.Module) -> torch.dtype | None:
    """The dtype packed weights are stored in: bfloat16 for a model whose weights are bf16 values (`weights: bf16`,
    koala.engine.quantize), else the weights' own (None)."""
    hf = hf_model.hf_model[0] if hasattr(hf_model, "hf_model") else hf_model
    return torch.bfloat16 if getattr(hf, "koala_weights", None) == "bf16" else None  # quantize_weights' mark


def pack_linears(hf_model: nn.Module, store: torch.dtype | None = None) -> int:
    """Replace the decoder's and the head's nn.Linear layers with `PackedLinear` (the kernel must be loaded).
    `store`: their weights rounded to this dtype, the kernel's copy stored in it and the dense GEMM reading the same
    rounded values (a drafter's: `Session.drafter`); default: `store_dtype`, weights already of its values. Layers
    packed already (shared with a packed target) are left as they are. Returns how many were replaced."""
    found = _linears(hf_model)
    rounded, store = store is not None, store if store is not None else store_dtype(hf_model)
    with torch.no_grad():
        for parent, child, module in found:
            setattr(parent, child, PackedLinear(module, store, rounded))
    return len(found)


def packed(model) -> bool:
    """Whether a model (a Hugging Face one, or koala's engine over one) runs its linear layers packed."""
    return isinstance(model, nn.Module) and any(isinstance(m, PackedLinear) for m in model.modules())


def _time(fn, reps: int = 2) -> float:
    fn()  # brings the weights' first pages in, and the kernel's threads up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(hf_model: nn.Module, widths=MEASURE_WIDTHS, rounds: int = MEASURE_ROUNDS) -> dict:
    """ms of every linear layer of the model once, by torch's GEMM and by koala's kernel, at each width: the two
    timed in turns (the order swapped every round), each width's figure the median over the rounds."""
    layers, store = [m for _, _, m in _linears(hf_model)], store_dtype(hf_model)
    with torch.no_grad():
        packs = [torch.ops.koala.pack(m.weight.detach() if store is None else m.weight.detach().to(store))
                 for m in layers]
        dtype = layers[0].weight.dtype
        ms: dict[str, dict[int, list[float]]] = {"torch": {w: [] for w in widths}, "koala": {w: [] for w in widths}}
        for r in range(rounds):
            for w in widths:
                xs = {k: torch.randn(w, k, dtype=dtype) for k in {m.in_features for m in layers}}
                runs = {"torch": lambda: [F.linear(xs[m.in_features], m.weight) for m in layers],
                        "koala": lambda: [torch.ops.koala.small_linear(xs[m.in_features], p, m.out_features)
                                          for m, p in zip(layers, packs)]}
                for name in (("torch", "koala") if r % 2 == 0 else ("koala", "torch")):
                    ms[name][w].append(_time(runs[name]))
    return {name: {w: round(sorted(v)[len(v) // 2], 3) for w, v in by.items()} for name, by in ms.items()}


def _measured(hf_model: nn.Module) -> dict:
    """`measure`, cached per machine and model shape under $KOALA_CACHE/calibration."""
    from koala.assets import cache_dir
    from koala.io import cached_json, digest
    from koala.precision import cpu_flags
    from koala.threads import cpu_model

    layers = [m for _, _, m in _linears(hf_model)]
    key = {"what": "decode_gemm", "cpu": cpu_model(), "flags": cpu_flags(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": str(layers[0].weight.dtype),
           "store": str(store_dtype(hf_model) or layers[0].weight.dtype), "widths": list(MEASURE_WIDTHS),
           "shapes": sorted({(m.out_features, m.in_features) for m in layers}), "layers": len(layers),
           "source": hashlib.sha256(SOURCE.read_bytes() + inspect.getsource(measure).encode()).hexdigest()}
    path = cache_dir() / "calibration" / f"gemm-{digest(key)}.json"

    def parse(d: dict) -> dict:
        return {**d, "ms": {n: {int(w): float(v) for w, v in by.items()} for n, by in d["ms"].items()}}

    return cached_json(path, lambda: {**key, "ms": measure(hf_model)}, parse)


def choose(hf_model: nn.Module, setting: str = "auto") -> GemmChoice:
    """Which GEMM the model's decode steps should run (see the module's docstring); nothing is changed here.

    Raises:
        KoalaError: a setting or $KOALA_GEMM that is none of auto, koala, torch; `koala` where the kernel cannot run.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in SETTINGS:
        raise KoalaError(f"{ENV}={forced!r} is not one of {', '.join(SETTINGS)}: set it to one, or unset it")
    if setting not in SETTINGS:
        raise KoalaError(f"gemm {setting!r} is not one of {', '.join(SETTINGS)}: use auto, koala or torch")
    setting, by = (forced, f"forced by {ENV}") if forced else (setting, "set by gemm")
    if setting == "torch":
        return GemmChoice("torch", by)
    if packed(hf_model):
        return GemmChoice("koala", "packed already")
    p = next(hf_model.parameters())
    if p.device.type != "cpu" or p.dtype not in DTYPES or not _linears(hf_model):
        if setting == "koala":
            raise KoalaError(f"koala's GEMM kernel runs float32 or bfloat16 linear layers on a CPU, not {p.dtype} on "
                             f"{p.device.type}: set {ENV}=torch")
        return GemmChoice("torch", f"{p.device.type}, {str(p.dtype).removeprefix('torch.')}")
    if not load():
        if setting == "koala":
            raise KoalaError(f"koala's GEMM kernel cannot run here ({unsupported() or 'its build failed'}): "
                             f"set {ENV}=torch")
        return GemmChoice("torch", unsupported() or "the kernel's build failed")
    if setting == "koala":
        return GemmChoice("koala", by)
    ms = _measured(hf_model)["ms"]
    k, t = sum(ms["koala"].values()), sum(ms["torch"].values())
    widths = "/".join(str(w) for w in sorted(ms["koala"]))
    verdict = f"{t / k:.2f}x torch's at widths {widths} on this CPU"
    return GemmChoice("koala" if k < t else "torch", verdict)


def use_for(hf_model: nn.Module, setting: str = "auto") -> GemmChoice:
    """`choose`, then pack the model's linear layers where the choice is koala's kernel; the choice is printed."""
    from koala.precision import announce_line

    c = choose(hf_model, setting)
    if c.name == "koala" and not packed(hf_model):
        pack_linears(hf_model)
    announce_line(c.describe())
    return c
