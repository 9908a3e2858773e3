"""What every task shares: the config, and the target loaded once per worker process."""

from __future__ import annotations

import threading

from koala.config import KoalaConfig, TargetConfig, load_config
from koala.errors import KoalaError
from koala.engine.model import Transformer
from koala.engine.session import Session

_SESSIONS: dict[tuple, Session] = {}
_LOCK = threading.Lock()


def session_for(tc: TargetConfig, compile: bool = False, weights: str = "full", autotune: bool = True) -> Session:
    """The target and its engine (eager, or compiled), loaded on first use in this process and reused by every later
    task: the target's weights are loaded once, and a compiled engine compiles once per process. `weights` int8: a
    target of its own, its linear layers int8 weight-only (eval.weights; koala.engine.quantize); `autotune` False:
    compiled steps built without autotuning on a CPU (eval.autotune)."""
    from koala.engine.compile import compile_mode

    key = (tc.spec, tc.dtype, tc.device, tc.trust_remote_code, weights)
    engine = (compile, autotune if compile else True)  # an eager engine does not autotune anything
    with _LOCK:
        if (key, engine) not in _SESSIONS:
            loaded = next((s.target for (k, _), s in _SESSIONS.items() if k == key), None)
            if loaded is None:
                from koala.engine.quantize import quantize_weights
                from koala.targets import load_target
                from koala.threads import configure_threads

                configure_threads()
                loaded = load_target(tc.spec, dtype=tc.dtype, device=tc.device, trust_remote_code=tc.trust_remote_code)
                quantize_weights(loaded.model, weights)
            mode = compile_mode(loaded.model.device, autotune) if compile else None
            s = Session(loaded, Transformer(loaded.model), compile_mode=mode)
            if compile:  # koala's decode GEMM where it measures faster, then the compiled steps
                s.compile()
            _SESSIONS[(key, engine)] = s
        return _SESSIONS[(key, engine)]


def decoding_target(cfg: KoalaConfig) -> TargetConfig:
    """The target as the evaluation decodes it: `eval.dtype` resolved (auto: measured once per machine)."""
    from koala.precision import decode_dtype

    if cfg.eval.dtype == "target":
        return cfg.target
    name = cfg.eval.dtype
    if name == "auto":
        name = decode_dtype("auto", session_for(cfg.target).target.model).name
    return cfg.target.model_copy(update={"dtype": name})


def retry_unless_koala_error(task, task_run, state) -> bool:
    """Prefect's retry condition: a KoalaError (bad input, a refused resume, an interrupt) fails the same way on
    every try, so it is not retried; anything else (a worker lost, a transient I/O error) is."""
    try:
        state.result()
    except KoalaError:
        return False
    except Exception:  # noqa: BLE001 - every other failure may pass on a retry
        return True
    return True


def resolve_config(profile: str | None, config_path: str | None, overrides: list[str] | None) -> KoalaConfig:
    return load_config(profile if config_path is None else None, config_path, overrides or [])
