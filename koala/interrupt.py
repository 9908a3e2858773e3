"""Stopping cleanly: SIGINT and SIGTERM end a command within seconds, with nothing half-written.

The CLI installs `handle_signals()`: the first SIGINT or SIGTERM sets `STOP` and raises KeyboardInterrupt in the
main thread; work running in other threads (Prefect's task threads) calls `check()` between units of work (a decode
step, a batch, an optimizer step) and stops there. Files are only ever renamed into place when complete
(koala.io), so stopping anywhere leaves the previous state or the new one, never a mix.

`fault(point)` is the fault campaign's hook (bench/faults.py): with KOALA_FAULT=POINT:N[:ACTION] in the
environment, the N-th arrival at POINT SIGKILLs the process (ACTION kill, the default), raises OSError (raise), or
raises a full disk's OSError (enospc). So a kill or an error is placed exactly: while writing a shard, renaming it,
updating the manifest, after an optimizer step, while registering. Without KOALA_FAULT it does nothing.
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
    """Work stopped because SIGINT or SIGTERM asked it to (never retried); `code` is the exit status to end with."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def check() -> None:
    """Raise Interrupted if a stop was asked for; call it between units of work."""
    if STOP.is_set():
        raise Interrupted("interrupted: finished work is kept; run the same command again to continue")


IN_FLOW = threading.Event()  # set while a Prefect flow runs in the main thread (the CLI's in_prefect)


def _handler(signum, frame):
    first = not _received  # the watcher thread may have set STOP already: this handler's own record decides
    STOP.set()
    _received.append(signum)
    if not first:  # a second signal while cleaning up: give up on cleanup and exit now
        os._exit(128 + signum)
    if IN_FLOW.is_set():
        raise KeyboardInterrupt  # the flow engine records the run as crashed; the CLI then exits 130/143
    import sys

    sys.stderr.write("interrupted: finished work is kept; run the same command again to continue\n")
    raise SystemExit(128 + signum)  # unwinds (finally blocks run), and no framework turns it into a traceback


def handle_signals() -> None:
    """SIGINT and SIGTERM: set STOP and raise KeyboardInterrupt in the main thread (call from the main thread).

    A flow engine may install a SIGTERM handler of its own for the length of a flow (Prefect does), so STOP is also
    set from the C level: `signal.set_wakeup_fd` writes every signal's number to a socket a watcher thread reads,
    whichever Python handler runs. Work in other threads then stops at its next check() even while the main thread
    is still unwinding the flow.
    """
    import socket

    global _wakeup
    if threading.current_thread() is not threading.main_thread():
        return  # signals are delivered to the main thread only; a library caller in a thread keeps its own
    STOP.clear()
    _received.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)
    if _wakeup is None:
        r, w = socket.socketpair()
        r.setblocking(True)
        w.setblocking(False)
        try:
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the Python handlers alone
            return
        _wakeup = (r, w)
        threading.Thread(target=_watch, args=(r,), name="koala-signal-watch", daemon=True).start()


_wakeup = None


def _watch(sock) -> None:
    while True:
        data = sock.recv(64)
        if not data:
            return
        if any(b in (signal.SIGINT, signal.SIGTERM) for b in data):
            STOP.set()


def exit_code() -> int:
    """The conventional exit status for the signal that stopped us: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def fault(point: str) -> None:
    """Fault injection for the fault campaign: SIGKILL this process at the N-th arrival at `point` (KOALA_FAULT)."""
    spec = os.environ.get("KOALA_FAULT")
    if not spec:
        return
    name, n, action = (spec.split(":") + ["1", "kill"])[:3]
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(n or 1):
        return
    if action == "enospc":
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
    if action == "raise":
        raise OSError(f"injected fault at {point}")
    os.kill(os.getpid(), signal.SIGKILL)
