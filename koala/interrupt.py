"""Stopping cleanly: SIGINT and SIGTERM end a command within seconds, with nothing half-written.

The CLI installs `handle_signals()`: the first SIGINT or SIGTERM sets `STOP` and raises KeyboardInterrupt in the
main thread; work running in other threads (Prefect's task threads) calls `check()` between units of work (a decode
step, a batch, an optimizer step) and stops there. Files are only ever renamed into place when complete
(koala.io), so stopping anywhere leaves the previous state or the new one, never a mix.

`fault(point)` is the fault campaign's hook (bench/faults.py): with KOALA_FAULT=POINT:N in the environment, the
process SIGKILLs itself the N-th time it reaches POINT, so a kill can be placed exactly (while writing a shard,
renaming it, updating the manifest, after an optimizer step). Without KOALA_FAULT it does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

from koala.errors import KoalaError

STOP = threading.Event()
_received: list[int] = []  # the signals that asked to stop, in order
_counts: dict[str, int] = {}


class Interrupted(KoalaError):
    """Work stopped because SIGINT or SIGTERM asked it to (never retried)."""


def check() -> None:
    """Raise Interrupted if a stop was asked for; call it between units of work."""
    if STOP.is_set():
        raise Interrupted("interrupted: finished work is kept; run the same command again to continue")


def _handler(signum, frame):
    first = not STOP.is_set()
    STOP.set()
    _received.append(signum)
    if first:  # a second signal while cleaning up is not raised again: cleanup finishes
        raise KeyboardInterrupt


def handle_signals() -> None:
    """SIGINT and SIGTERM: set STOP and raise KeyboardInterrupt in the main thread (call from the main thread)."""
    STOP.clear()
    _received.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def exit_code() -> int:
    """The conventional exit status for the signal that stopped us: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def fault(point: str) -> None:
    """Fault injection for the fault campaign: SIGKILL this process at the N-th arrival at `point` (KOALA_FAULT)."""
    spec = os.environ.get("KOALA_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
