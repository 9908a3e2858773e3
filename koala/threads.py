"""How many threads koala's torch work uses: set knowingly, printed, never left to chance.

Two processes on 2 cores that each take every core were measured at ~1 token/s each against ~16 for one alone:
oversubscribed threads spin against each other. So koala takes all the cores this process may run on, divided by
the processes started beside it on this host (torchrun's LOCAL_WORLD_SIZE), unless KOALA_THREADS (or OMP_NUM_THREADS)
says otherwise.

Beside other busy processes, spinning OpenMP threads fight over the cores and koala's decoding collapsed to a few per
cent of its idle speed (bench/load.py). So where the count is koala's own default, decoding shares the cores: every
quarter second `share_cores()` reads how much CPU time the rest of the machine used on this process's cores
(/proc/stat minus this process's own time) and runs torch on the cores the others leave idle, never fewer than one,
going back up once they are idle again. An explicit KOALA_THREADS / OMP_NUM_THREADS turns this off.
"""

from __future__ import annotations

import os
import time

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
    global _share
    chosen = _env_int("KOALA_THREADS") is not None or _env_int("OMP_NUM_THREADS") is not None
    _share = CoreShare(n) if n == default_threads() and not chosen and CoreShare.supported() else None
    return n


class CoreShare:
    """Runs torch on the cores of this process's affinity set that other processes leave idle (at least one).

    `tick()` is cheap enough to call every decoding step: it reads /proc only once per `interval` seconds. Busy time
    of the set comes from /proc/stat, this process's own from `time.process_time()` (all its threads, spinning ones
    included), so what remains is the others'. Threads drop as soon as the idle share is below the current count by
    half a core and come back only once a further core is idle by three quarters, so the count does not flap.
    """

    def __init__(self, threads: int, interval: float = 0.25):
        self.max_threads, self.threads, self.interval = threads, threads, interval
        self.cores = sorted(os.sched_getaffinity(0))
        self._last = self._sample()

    @staticmethod
    def supported() -> bool:
        return hasattr(os, "sched_getaffinity") and os.path.exists("/proc/stat")

    def _sample(self) -> tuple[float, float, float]:
        """(wall clock, busy seconds of this process's cores, this process's CPU seconds)."""
        wanted, busy = {f"cpu{c}" for c in self.cores}, 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *ticks = line.split()
                if name in wanted:
                    t = [int(x) for x in ticks]
                    busy += sum(t[:8]) - t[3] - t[4]  # all but idle and iowait (guest is inside user)
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def others(self) -> float | None:
        """Cores the rest of the machine kept busy since the last reading, or None before `interval` has passed."""
        now = time.monotonic()
        if now - self._last[0] < self.interval:
            return None
        cur = self._sample()
        wall = cur[0] - self._last[0]
        busy, own = cur[1] - self._last[1], cur[2] - self._last[2]
        self._last = cur
        return max(0.0, (busy - own) / wall)

    def tick(self) -> int:
        others = self.others()
        if others is not None:
            idle = len(self.cores) - others
            if idle < self.threads - 0.5:
                self.threads = max(1, round(idle))
            elif idle >= self.threads + 0.75:
                self.threads = min(self.max_threads, int(idle + 0.25))
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
        return self.threads


_share: CoreShare | None = None


def configured() -> int:
    """The thread count koala decodes with when no other process is busy (CoreShare may run fewer for a while)."""
    return _share.max_threads if _share is not None else torch.get_num_threads()


def restore() -> int:
    """Back to the configured thread count (`configured`) after a decoding loop that may have given cores away: what
    runs next in the process (a training) is not a decoding loop and would never take them back."""
    n = configured()
    if _share is not None:
        _share.threads = n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def share_cores(device: torch.device | None = None) -> None:
    """Let the decoding loop give cores to other busy processes (see CoreShare); a no-op unless koala chose the count,
    and on a GPU."""
    if _share is not None and (device is None or device.type == "cpu"):
        _share.tick()


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
