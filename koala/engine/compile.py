"""Compiled decode steps (gpt-fast's pattern): inductor with frozen weights on a CPU, CUDA graphs on CUDA.

On CUDA the default mode is `reduce-overhead`: inductor's kernels captured as CUDA graphs (cudagraph trees), one
graph per step shape, i.e. per verify width and per sampler batch. Nothing in a step synchronises with the host
(the cache is written by position with `index_put_`; the mask is built from the input positions on the device;
the rejection rule runs on the device after it), so a replay is one launch. A
replay reuses its output memory, so each call marks a new step and returns copies of its outputs (logits of a few
tokens: a negligible copy) that later steps cannot overwrite.

A step of a few tokens is one graph per width with static shapes: the whole static KV cache is attended to under a
mask built from the input positions, so nothing depends on how long the sequence is. On a CPU inductor's
max-autotune picks, per GEMM shape, between MKL and its own small-M micro-kernels, which read the weights once for
all rows: verifying gamma + 1 tokens then costs little more than one (bench/decode.py prints the curve). Compiled
artifacts are cached on disk under $KOALA_CACHE/inductor, so a second run, or another process, loads them instead
of compiling again; `compile_seconds()` reports the time spent compiling apart from decoding.

On a CPU each step is compiled ahead of time instead (`AotStep`), with the slots it attends to a symbolic size
(those below the step's end: `Transformer.step`), so attention reads the sequence, not the whole cache. Exported
with `torch.export`, compiled by AOTInductor (in a child process) with frozen, pre-packed weights into a package under $KOALA_CACHE/aot, and loaded
from there (about a second for the default target) by every later process on the same machine, so a second
`koala eval` or `make demo` compiles nothing. A package is keyed by everything its code depends on (the model's
weights, dtype, cache size, the step's inputs and outputs, the engine's source, torch's and transformers' versions,
the CPU model and its flags, the configured threads); a package that fails to load, or whose first output differs
from the eager forward's on the same inputs, is rebuilt, never trusted. Where the autotuned wide step costs in
proportion to its width, it is built a second time without autotuning and each width runs the faster build
(`AotStep._by_width`). The inductor cache above serves the CUDA path and `KOALA_AOT=0`.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from koala.engine.kv_cache import SLOT_ROUND
from koala.engine.spinner import spinner
from koala.errors import KoalaError
from koala.io import atomic_path, digest, tmp_prefix

MAX_STEP_WIDTH = 32  # steps of at most this many tokens (a chain's or a draft tree's) run compiled; a prefill eager
_compile_s = 0.0
_builds: list[dict] = []
_aot_steps = 0
AOT_FORMAT = 2  # bumped when a package's inputs or outputs change meaning
AOT_CACHE_GB = 8.0  # the packages kept on disk (least recently used first out); KOALA_AOT_CACHE_GB overrides
# A wide step whose widest call costs more than this many of its narrowest is built a second time without
# autotuning, and each width then runs the build that measured faster at it (`AotStep._by_width`). Autotuned
# micro-kernels that fit their width read the weights once for 32 rows as for 2; ones that do not cost 10-15 times
# as much at 32 (the default target on an AMD EPYC without AMX); a 1-layer head's attention and overheads alone
# make it about 3.
WIDE_SCALING = 4.0
TIMED_WIDTHS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32)  # where the two builds of a wide step are compared
UNTUNED = "default"  # inductor's mode without autotuning: the linears run oneDNN's (MKL's) GEMMs at every width
WIDTH_ROUNDS = 5  # rounds of `AotStep._time_widths`: each width's cost is its median over them
WIDTH_TIMING = 3  # bumped when `_time_widths` measures differently: every machine then times its builds again


def builds() -> list[dict]:
    """The packages this process has built: the model's layers, whether the step is the wide one, inductor's mode,
    seconds."""
    return list(_builds)


def compile_seconds() -> float:
    """Seconds spent so far in this process compiling (the first call of each new step shape; 0 when every step
    was loaded from the ahead-of-time cache)."""
    return _compile_s


def compilations() -> int:
    """Compiled graphs and ahead-of-time packages this process has built or loaded (a test of no recompilation)."""
    return _graphs() + _aot_steps


def aot_dir() -> Path:
    """Where the packages live: $KOALA_AOT_DIR, default $KOALA_CACHE/aot (a package holds its model's weights)."""
    from koala.assets import cache_dir

    return Path(os.environ["KOALA_AOT_DIR"]) if os.environ.get("KOALA_AOT_DIR") else cache_dir() / "aot"


def aot_enabled(device: torch.device, mode: str | None = None) -> bool:
    """Ahead-of-time packages on a CPU unless KOALA_AOT=0 or a CUDA-graph mode is asked for (then inductor compiles
    in each process, as on CUDA)."""
    graphs = mode in ("reduce-overhead", "max-autotune")
    return device.type == "cpu" and not graphs and os.environ.get("KOALA_AOT", "1") != "0"


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


def compile_mode(device: torch.device, autotune: bool = True) -> str | None:
    """The mode compiled steps are built in: None (`default_mode`), or on a CPU without `autotune` UNTUNED (oneDNN's
    GEMMs at every width: a shorter build, nearly as fast as the autotuned one where autotuning finds little better,
    e.g. float32 on a CPU without a bf16 matrix unit: bench/results/wide_builds*.json)."""
    return None if autotune or device.type != "cpu" else UNTUNED


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
        self.sliced = False  # steps attend to the whole static cache (one graph, or CUDA graph, per width)

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


class AotStep:
    """A model's steps compiled ahead of time (AOTInductor), cached on disk per machine, called like `CompiledStep`.

    One package per step signature: 2..MAX_STEP_WIDTH tokens (a symbolic width, as `CompiledStep`'s), token ids or
    given embeddings, the features and logits asked for, with or without a tree's positions and mask. A one-token
    step runs the wide package at width 2 (`_one_as_two`): one package less to compile per model (minutes for a
    target on a 2-core CPU), and on a CPU a GEMM over two rows reads the weights once as over one (the default
    target's step costs about what its one-token package's does: bench/results/one_token_step*.json).
    The KV caches are inputs the package writes in place, so the eager prefill, `move_slots` and the compiled steps
    share one cache. The first call of each package in a process is checked against the eager forward on copies of
    the caches; a mismatch (a stale package the key did not catch) deletes it and compiles again.
    """

    one_as_two = True  # False: one-token steps run a one-token package of their own (bench/step_cost.py compares)

    def __init__(self, model, mode: str | None = None):
        configure_inductor(model.device)
        self.model = model
        self.mode = mode or default_mode(model.device)
        if any(hasattr(m, "packed") for _, m in _weight_only_layers(model)):
            self.mode = UNTUNED  # the GEMMs are koala's kernel (koala.engine.gemm): nothing left to autotune
        self.graphs = False
        self.sliced = True  # steps attend to the slots below their end: the slot count is symbolic, like the width
        self.steps: dict[tuple, Callable] = {}
        self.built = self.loaded = 0  # packages compiled, and loaded from the cache, by this step
        self._weights: str | None = None
        self._second_build = True

    @property
    def second_build(self) -> bool:
        """Whether a wide step whose autotuned build scales poorly with its width is built a second time without
        autotuning (`_by_width`); False: one build, which runs every width. Changing it drops the wide steps already
        resolved, so the next call runs (and a cost curve measures) what the setting says."""
        return self._second_build

    @second_build.setter
    def second_build(self, value: bool) -> None:
        if value != self._second_build:
            self.steps = {sig: step for sig, step in self.steps.items() if not sig[0]}
        self._second_build = value

    def __call__(self, idx, input_pos, *, embeds=None, hidden=False, logits=True, tree=None):
        if hidden is False and logits:  # the features come free with the logits: one package serves plain decoding
            lg, _ = self(idx, input_pos, embeds=embeds, hidden=True, logits=True, tree=tree)  # and verification
            return lg, None
        x = _canonical(idx if embeds is None else embeds)
        if self.one_as_two and x.shape[1] == 1 and x.shape[0] == 1 and tree is not None and input_pos.dim() == 1:
            return self._one_as_two(x, input_pos, embeds is not None, hidden, logits, tree)
        args = [x, _canonical(input_pos)]
        if tree is not None:
            args += [_canonical(tree[0]), _canonical(tree[1])]
        caches = [t for c in self.model.caches for t in (c.k, c.v)]
        sig = (x.shape[1] > 1, embeds is not None, hidden, logits, tree is not None, input_pos.dim(), x.shape[0],
               self.model.max_seq_len)
        step = self.steps.get(sig)
        if step is None:
            global _aot_steps
            step = self._load_or_build(sig, args, caches, self.mode)
            _aot_steps += 1
            if sig[0] and self.mode != UNTUNED:
                step = self._by_width(sig, args, caches, step)
            self.steps[sig] = step
        return self._unpack(step(*args, *caches), hidden, logits)

    def _one_as_two(self, x, input_pos, embeds: bool, hidden, logits: bool, tree) -> tuple:
        """A one-token step as the wide step at width 2: the token again as a second row, written to the next slot
        (past the sequence's end: the next step writes its own token there before anything reads it; after the
        last slot, one of the SLOT_ROUND spare slots a compiled cache has and attention never reads), seeing what the
        first row sees; the first row's outputs."""
        two = torch.cat([x, x], 1)
        pos = torch.cat([input_pos, input_pos + 1])
        wide_tree = (torch.cat([tree[0], tree[0] + 1]), torch.cat([tree[1], tree[1]]))
        lg, feats = self(None if embeds else two, pos, embeds=two if embeds else None, hidden=hidden, logits=logits,
                         tree=wide_tree)
        return (None if lg is None else lg[:, :1]), (None if feats is None else feats[:, :1])

    @staticmethod
    def _unpack(out, hidden, logits) -> tuple:
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        lg = out.pop(0) if logits else None
        return lg, (out.pop(0) if out else None)

    # -- the package cache ------------------------------------------------------------------------------------------
    def key(self, sig: tuple, mode: str | None = None) -> dict:
        """Everything a package's code depends on (its file name is this dict's digest); `mode`: inductor's, by
        default the step's own."""
        from koala.engine.kv_cache import CacheView, KVCache
        from koala.precision import cpu_flags
        from koala.threads import configured as configured_threads, cpu_model
        import transformers

        # the code a package traced: the model's module and the step wrapper (not this file's docstrings or caching)
        src = (Path(sys.modules[type(self.model).__module__].__file__).read_text() + inspect.getsource(KVCache)
               + inspect.getsource(CacheView) + inspect.getsource(_StepModule))
        layers = _weight_only_layers(self.model)
        src += "".join(sorted({inspect.getsource(type(m)) for _, m in layers}))  # traced too
        if any(hasattr(m, "packed") for _, m in layers):  # and the kernel they call, and when they call it
            from koala.engine import gemm

            src += gemm.SOURCE.read_text() + f"rows<={gemm.MAX_ROWS}"
        wide, embeds, hidden, logits, tree, pos_dim, batch, slots = sig
        mode = mode or self.mode
        return {
            "format": AOT_FORMAT, "weights": self.weights_digest(), "dtype": str(self.model.dtype),
            "features_before_norm": self.model.features_before_norm, "slots": slots, "batch": batch,
            "width": f"2..{MAX_STEP_WIDTH}" if wide else "1", "embeds": embeds,
            "hidden": list(hidden) if isinstance(hidden, tuple) else hidden,
            "logits": logits, "tree": tree, "pos_dim": pos_dim, "mode": mode,
            "engine_source": hashlib.sha256(src.encode()).hexdigest(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "threads": configured_threads(),  # not the momentary count CoreShare may have lowered
            "inductor": self.inductor_configs(mode),
        }

    def inductor_configs(self, mode: str | None = None) -> dict:
        """AOTInductor's settings: frozen weights, autotuned GEMMs (max-autotune modes), and linears that read one
        input concatenated (q, k, v; gate and up): fewer, wider GEMMs, a parallel region less for each group."""
        return {"freezing": True, "max_autotune": (mode or self.mode).startswith("max-autotune"),
                "cpp.enable_concat_linear": True}

    def weights_digest(self) -> str:
        """A digest of the model's weights: names, shapes, dtypes, each tensor's sum and a strided sample of it (a
        weight-only layer's int8 weights and scales included: they are buffers, koala.engine.quantize)."""
        if self._weights is None:
            h = hashlib.sha256()
            int8 = [(f"{m}.{b}", t) for m, mod in _weight_only_layers(self.model) for b, t in mod.named_buffers()]
            with torch.no_grad():
                for name, p in [*self.model.named_parameters(), *int8]:
                    flat = p.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
                    total = flat.sum(dtype=torch.float64).item()
                    h.update(f"{name}{tuple(p.shape)}{p.dtype}{total!r}".encode() + sample)
            self._weights = h.hexdigest()
        return self._weights

    def _load_or_build(self, sig: tuple, args: list, caches: list, mode: str) -> Callable:
        key = self.key(sig, mode)
        path = aot_dir() / f"{digest(key)}.pt2"
        if path.exists():
            step = _load_package(path)
            if step is not None and self._agrees(step, args, caches, sig):
                os.utime(path)  # recently used: the last to be pruned
                self.loaded += 1
                return step
            print(f"[koala] compiled step {path.name} is stale or corrupt: rebuilding it", file=sys.stderr)
            path.unlink(missing_ok=True)
        step = self._build(sig, args, caches, path, key, mode)
        self.built += 1
        _prune(path.parent, keep=path)
        if not self._agrees(step, args, caches, sig):
            raise KoalaError(f"the compiled step {path} disagrees with the eager forward: run with --no-compile "
                             "(eval.compile: false) and report it")
        return step

    def _agrees(self, step: Callable, args: list, caches: list, sig: tuple) -> bool:
        """The package's outputs on copies of the caches against the eager forward's on other copies."""
        from koala.engine.kv_cache import CacheView

        _, embeds, hidden, logits, tree, *_ = sig
        mine = [t.clone() for t in caches]
        theirs = [t.clone() for t in caches]
        try:
            got = self._unpack(step(*[a.clone() for a in args], *mine), hidden, logits)
        except Exception:  # a package that loads but cannot run (corrupt, or built for other inputs)
            return False
        views = [CacheView(theirs[i], theirs[i + 1]) for i in range(0, len(theirs), 2)]
        with torch.no_grad():
            want = self.model.forward(None if embeds else args[0], args[1], embeds=args[0] if embeds else None,
                                      hidden=hidden, logits=logits, tree=(args[2], args[3]) if tree else None,
                                      caches=views)
        tol = 2e-3 if self.model.dtype == torch.float32 else 6e-2
        for g, w in zip(got, want):
            if (g is None) != (w is None):
                return False
            if g is not None and (g.shape != w.shape or
                                  (g.float() - w.float()).abs().max() > tol * max(1.0, w.float().abs().max().item())):
                return False
        return all((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()) for a, b in zip(mine, theirs))

    def _by_width(self, sig: tuple, args: list, caches: list, tuned: Callable) -> Callable:
        """The wide step, or the faster of two builds at each width where autotuning fits its width poorly.

        Autotuning picks each GEMM's kernel at one width, and the symbolic width then runs it at all of them: on a
        CPU without AMX the micro-kernels chosen for a few rows cost in proportion to the rows (bench/wide_builds.py),
        where oneDNN's GEMMs read the weights once for any width. So the tuned step is
        timed at its narrowest and widest widths; where the widest costs more than WIDE_SCALING of the narrowest,
        the step is built again without autotuning, both are timed at TIMED_WIDTHS and each width runs the build
        faster at the nearest timed width at or below it. The choice is stored beside the packages (once per
        machine, under the same key). With `second_build` False the tuned step is returned as it is."""
        key = {**self.key(sig), "by_width": list(TIMED_WIDTHS), "scaling": WIDE_SCALING, "untuned": UNTUNED,
               "timing": WIDTH_TIMING}
        path = aot_dir() / f"{digest(key)}.widths.json"
        try:
            choice = {int(w): int(i) for w, i in json.loads(path.read_text())["build_by_width"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            choice = None
        untuned = None
        if not self.second_build:
            return tuned
        if choice is None:
            global _compile_s
            t, before = time.perf_counter(), _compile_s
            (ends,) = self._time_widths([tuned], args, caches, (TIMED_WIDTHS[0], TIMED_WIDTHS[-1]))
            ms: dict = {"tuned": ends}
            if ends[TIMED_WIDTHS[-1]] <= WIDE_SCALING * ends[TIMED_WIDTHS[0]]:
                choice = {w: 0 for w in TIMED_WIDTHS}
            else:
                untuned = self._load_or_build(sig, args, caches, UNTUNED)
                ms = dict(zip(("tuned", "untuned"), self._time_widths([tuned, untuned], args, caches, TIMED_WIDTHS)))
                choice = {w: int(ms["untuned"][w] < ms["tuned"][w]) for w in TIMED_WIDTHS}
                print("[koala] wide steps, ms by width, autotuned / not: " + ", ".join(
                    f"{w}: {ms['tuned'][w]:.1f} / {ms['untuned'][w]:.1f}" for w in TIMED_WIDTHS), file=sys.stderr)
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps({"key": key, "ms": ms, "build_by_width": choice}, indent=1))
            _compile_s = before + time.perf_counter() - t  # the second build and the timing, each counted once
        if not any(choice.values()):
            return tuned
        return _ByWidth([tuned, untuned or self._load_or_build(sig, args, caches, UNTUNED)], choice)

    def _time_widths(self, steps: list[Callable], args: list, caches: list, widths) -> list[dict[int, float]]:
        """Each build's ms at each width, on inputs shaped like `args` (the first token's, repeated) and on copies
        of the caches. Timed in WIDTH_ROUNDS rounds, each running every width on every build in turn, the builds'
        order reversed every other round (one untimed call brings the width's step in, the faster of two timed calls
        counts); each width's cost is its median over the rounds it was timed in. Builds compared at one width are
        timed moments apart, so a drift in the machine's speed weighs on both alike. A width where one build costs
        1.5 times another or more in a round is decided: it is not timed again."""
        x, pos = args[0], args[1]
        slots = self.model.max_seq_len
        p0 = max(0, min(256, slots - MAX_STEP_WIDTH - 1))
        kv = [c.clone() for c in caches]
        inputs = {}
        for w in widths:
            p = torch.arange(p0, p0 + w, device=pos.device)
            a = [x[:, :1].expand(x.shape[0], w, *x.shape[2:]).contiguous(),
                 p if pos.dim() == 1 else p.expand(pos.shape[0], w).contiguous()]
            if len(args) > 2:  # a tree's positions and the slots each node sees (a chain's, here)
                S = min(slots, -(-(p0 + w) // SLOT_ROUND) * SLOT_ROUND)
                a += [p, torch.arange(S, device=pos.device) <= p[:, None]]
            inputs[w] = a
        ts: list[dict[int, list[float]]] = [{w: [] for w in widths} for _ in steps]
        close = list(widths)
        with torch.no_grad():
            for r in range(WIDTH_ROUNDS):
                for w in close:
                    for step, got in list(zip(steps, ts))[::-1 if r % 2 else 1]:
                        calls = []
                        for i in range(3):
                            t = time.perf_counter()
                            step(*inputs[w], *kv)
                            calls.append((time.perf_counter() - t) * 1e3)
                        got[w].append(min(calls[1:]))
                # a width where one build costs 1.5 times another or more is decided: not timed again
                close = [w for w in close if max(got[w][-1] for got in ts) < 1.5 * min(got[w][-1] for got in ts)]
        return [{w: sorted(v)[len(v) // 2] for w, v in got.items()} for got in ts]

    def _build(self, sig: tuple, args: list, caches: list, path: Path, key: dict, mode: str) -> Callable:
        """Export the step here (seconds), compile the package in a child process (minutes): a process that had
        compiled its own packages measured half the decoding speed of a fresh one loading the same packages, and a
        child takes the compiler's memory, workers and threads with it when it exits."""
        global _compile_s
        wide = sig[0]
        what = (f"{'one-token' if not wide else f'2-{MAX_STEP_WIDTH}-token'} step of a {len(self.model.layers)}-layer "
                f"model ({key['dtype'].removeprefix('torch.')}{', without autotuning' if mode == UNTUNED else ''})")
        t = time.perf_counter()
        with spinner(f"compiling the {what}, once for this machine"):
            module = _StepModule(self.model, *sig[1:5])
            dyn = None
            if wide or sig[4]:
                T = torch.export.Dim("width", min=2, max=MAX_STEP_WIDTH) if wide else None
                S = torch.export.Dim("slots", min=SLOT_ROUND, max=self.model.max_seq_len)
                tree = [{0: T} if wide else None, {0: T, 1: S} if wide else {1: S}] if sig[4] else []
                rest = tree + [None] * len(caches)  # tree positions, mask (T, slots); caches
                dyn = ({1: T} if wide else None, {args[1].dim() - 1: T} if wide else None, tuple(rest))
            # temporary siblings named as koala.io names them, so a killed build's leftovers are swept like any other
            with atomic_path(path) as package, tempfile.NamedTemporaryFile(
                    dir=path.parent, prefix=tmp_prefix(path), suffix=".tmp") as exported:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # export warns once per cache input about unlifting
                    # copies: the model's own cache buffers are module state; an input aliasing state cannot be mutated
                    ep = torch.export.export(module, tuple(args + [c.clone() for c in caches]), dynamic_shapes=dyn)
                    buf = io.BytesIO()  # torch names its archives *.pt2; the temporary sibling is *.tmp
                    torch.export.save(ep, buf)
                Path(exported.name).write_bytes(buf.getbuffer())
                del buf
                del ep
                configs = self.inductor_configs(mode)
                ops = any(hasattr(m, "packed") for _, m in _weight_only_layers(self.model))
                _compile_in_child(Path(exported.name), package, configs, ops)
            path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True))
        _compile_s += time.perf_counter() - t
        _builds.append({"layers": len(self.model.layers), "wide": wide, "mode": mode,
                        "seconds": round(time.perf_counter() - t, 1)})
        step = _load_package(path)
        if step is None:
            raise KoalaError(f"the compiled step {path} could not be loaded: run with --no-compile (eval.compile: false)")
        return step


def _weight_only_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's layers whose weights a step reads from buffers: int8 weight-only (koala.engine.quantize.Int8Linear)
    and koala's packed layout (koala.engine.gemm.PackedLinear)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "qweight") or hasattr(m, "packed")]


def _compile_in_child(exported: Path, package: Path, configs: dict, ops: bool = False) -> None:
    """AOTInductor over a saved ExportedProgram, in a fresh Python process with this one's threads; `ops`: the step
    calls koala's GEMM kernel (koala.engine.gemm), which the child loads first."""
    import subprocess

    from koala.threads import configured

    env = {**os.environ, "OMP_NUM_THREADS": str(configured())}
    r = subprocess.run([sys.executable, "-m", "koala.engine.compile", str(exported), str(package), json.dumps(configs),
                        "ops" if ops else ""], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not package.stat().st_size:
        lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
        last = (lines[-1] if lines else f"exit status {r.returncode}")[:200]
        raise KoalaError(f"the compiled engine could not be built ({last}): run with --no-compile "
                         "(eval.compile: false)")


def _child_main(exported: str, package: str, configs: str, ops: str = "") -> None:
    """The child: load the exported step and compile it into a package (koala's inductor settings)."""
    configure_inductor(torch.device("cpu"))
    if ops:
        from koala.engine.gemm import load

        load()
    with torch.no_grad(), warnings.catch_warnings():  # as exported: no autograd, the caches written in place
        warnings.simplefilter("ignore")
        ep = torch.export.load(exported)
        buf = io.BytesIO()  # AOTInductor names its file *.pt2; the caller's temporary sibling is not
        torch._inductor.aoti_compile_and_package(ep, package_path=buf, inductor_configs=json.loads(configs))
    Path(package).write_bytes(buf.getbuffer())


class _ByWidth:
    """Two builds of one wide step, each width run by the build `AotStep._by_width` measured faster at it."""

    def __init__(self, steps: list[Callable], choice: dict[int, int]):
        self.steps = steps
        timed = sorted(choice)
        self.build = {w: choice[max([t for t in timed if t <= w] or timed[:1])] for w in range(2, MAX_STEP_WIDTH + 1)}

    def __call__(self, x, *rest):
        return self.steps[self.build[x.shape[1]]](x, *rest)


class _StepModule(torch.nn.Module):
    """One step signature of a Transformer as a module torch.export can trace: caches in, written in place."""

    def __init__(self, model, embeds: bool, hidden, logits: bool, tree: bool):
        super().__init__()
        self.model, self.embeds, self.hidden, self.logits, self.tree = model, embeds, hidden, logits, tree

    def forward(self, x, input_pos, *rest):
        from koala.engine.kv_cache import CacheView

        tree = (rest[0], rest[1]) if self.tree else None
        kv = rest[2:] if self.tree else rest
        views = [CacheView(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        lg, feats = self.model.forward(None if self.embeds else x, input_pos, embeds=x if self.embeds else None,
                                       hidden=self.hidden, logits=self.logits, tree=tree, caches=views)
        return tuple(t for t in (lg, feats) if t is not None)


def _prune(folder: Path, keep: Path) -> None:
    """Delete the least recently used packages beyond KOALA_AOT_CACHE_GB (a package holds its model's weights)."""
    limit = float(os.environ.get("KOALA_AOT_CACHE_GB", AOT_CACHE_GB)) * 2**30
    packages = sorted(folder.glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for p in packages:
        total += p.stat().st_size
        if total > limit and p != keep:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)


def _load_package(path: Path) -> Callable | None:
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception:  # a truncated or foreign file: the caller rebuilds it
        return None


if __name__ == "__main__":  # the child process of `_compile_in_child`
    _child_main(*sys.argv[1:5])
