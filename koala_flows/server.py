"""A temporary Prefect server that cannot outlive koala, and stops when koala is interrupted.

Without PREFECT_API_URL, Prefect starts a temporary server in a child process of its own. That child shares the
terminal's process group, so Ctrl-C kills it at once while the flow still talks to it (minutes of connection-refused
retries), and a SIGKILL of koala leaves it running, holding a port. `prefect_api()` starts the same server
(prefect.server.api.server:create_app under uvicorn, on 127.0.0.1) itself instead:

* in its own session, so a terminal's SIGINT reaches koala only, which then stops the flow and this server in turn;
* watching its parent: Linux's PR_SET_PDEATHSIG, and a poll of the parent pid elsewhere, end it when koala dies,
  even by SIGKILL.

With PREFECT_API_URL set (a real server, a worker, the test harness) it does nothing.

Run as a module (`python -m koala_flows.server PARENT_PID PORT`) it is that child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from koala.errors import KoalaError

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Block until the Prefect API at `url` answers /health (a server started in another process)."""
    end = time.time() + timeout
    while not _healthy(url):
        if time.time() > end:
            raise TimeoutError(f"Prefect server at {url} did not become healthy in {timeout:.0f} s")
        time.sleep(0.5)


def server_env(home: Path, api: str, **extra) -> dict:
    """The environment of a Prefect server, its workers and its clients, kept under `home` (tests, benchmarks)."""
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"), **extra}
    env.pop("PREFECT_API_KEY", None)
    return env


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL to use: PREFECT_API_URL's, or a temporary server's that is stopped on exit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tempfile.NamedTemporaryFile(prefix="koala-prefect-server-", suffix=".log", delete=False)
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "koala_flows.server", str(os.getpid()), str(port)], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    keep_log = False
    try:
        t0 = time.monotonic()
        while not _healthy(url):
            if proc.poll() is not None:
                keep_log = True  # the error names it
                tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise KoalaError(f"the temporary Prefect server exited ({proc.returncode}): {tail[0]} (log: "
                                 f"{log.name}); set PREFECT_API_URL to a running server (`prefect server start`)")
            if time.monotonic() - t0 > STARTUP_TIMEOUT_S:
                keep_log = True
                raise KoalaError(f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s (log: "
                                 f"{log.name}): set PREFECT_API_URL to a running server instead")
            time.sleep(0.2)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain()  # logs and events still queued reach the server before it stops (else: a minute of retries)
    finally:
        _stop(proc)
        log.close()
        if not keep_log:
            Path(log.name).unlink(missing_ok=True)


class _OneLineKoalaErrors:
    """A logging filter: a KoalaError inside a flow or task is logged as its one line, not a traceback (the CLI
    prints it once more as `error: ...`)."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KoalaError):
            record.exc_info, record.exc_text = None, None
        return True


def run_flow(call):
    """Call a flow under prefect_api(), with koala's signal handling: SIGINT or SIGTERM stops it within seconds,
    keeps what is finished and leaves no server behind.

    Raises:
        Interrupted: with .code 130 (SIGINT) or 143 (SIGTERM).
    """
    import logging

    from prefect.exceptions import TerminationSignal

    from koala.interrupt import IN_FLOW, Interrupted, exit_code, handle_signals

    handle_signals()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_OneLineKoalaErrors())
    IN_FLOW.set()
    try:
        with prefect_api():
            return call()
    except (KeyboardInterrupt, TerminationSignal) as e:  # Prefect turns SIGTERM into TerminationSignal in a flow
        code = 128 + e.signal if isinstance(e, TerminationSignal) else exit_code()
        raise Interrupted("interrupted: finished shards and checkpoints are kept; run the same command again to "
                          "continue", code) from None
    finally:
        IN_FLOW.clear()


def _drain(timeout: float = 5.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout, at_exit=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with(parent: int) -> None:
    """End this process when `parent` does: PR_SET_PDEATHSIG on Linux, and a poll everywhere (also covers the race
    where the parent died before the prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    parent, port = int(sys.argv[1]), int(sys.argv[2])
    _die_with(parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main()
