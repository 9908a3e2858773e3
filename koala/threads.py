"""How many threads koala's torch work uses: set knowingly, printed, never left to chance.

Two processes on 2 cores that each take every core were measured at ~1 token/s each against ~16 for one alone:
oversubscribed threads spin against each other. So koala takes all the cores this process may run on, divided by
the processes started beside it on this host (torchrun's LOCAL_WORLD_SIZE), unless KOALA_THREADS (or OMP_NUM_THREADS)
says otherwise.
"""

from __future__ import annotations

import os

import torch

from koala.errors import KoalaError


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise KoalaError(f"{name}={raw!r} is not a number: set it to a count such as 2, or unset it") from None


def default_threads() -> int:
    local = _env_int("LOCAL_WORLD_SIZE") or 1
    return max(1, available_cores() // max(local, 1))


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n`, $KOALA_THREADS, $OMP_NUM_THREADS or the default above; returns it."""
    if n is None:
        k = _env_int("KOALA_THREADS")
        n = k if k is not None else _env_int("OMP_NUM_THREADS")
    n = default_threads() if n is None else n
    if n < 1:
        raise KoalaError(f"thread count must be >= 1, got {n}: set KOALA_THREADS to a positive number")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for every benchmark's JSON."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
