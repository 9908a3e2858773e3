"""Shard claims: one writer per shard across the workers that sample a dataset together.

A claim is a file `.FILE.claim` beside the shard, taken under a lock and kept fresh by a heartbeat; a holder killed
(even by SIGKILL) leaves a stale claim that the next worker takes over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from koala.io import write_json_atomic

CLAIM_LEASE_S = 120.0  # a claim whose holder is on another host and has not touched it for this long is stale


def worker_id() -> str:
    """Who writes: $KOALA_WORKER (set it per worker), else host:pid."""
    return os.environ.get("KOALA_WORKER") or f"{socket.gethostname()}:{os.getpid()}"


def _claim_live(holder: dict, path: Path, lease_s: float) -> bool:
    """A claim is live while its heartbeat (the file's mtime) is fresh and, on this host, its process runs (a pid
    gone or a zombie is dead at once; a reused pid is caught by the stale heartbeat)."""
    try:
        fresh = time.time() - path.stat().st_mtime < lease_s
    except FileNotFoundError:
        return False
    if not fresh or holder.get("host") != socket.gethostname():
        return fresh
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def claim(out_dir: Path, file: str, lease_s: float = CLAIM_LEASE_S) -> Iterator[dict | None]:
    """Hold shard `file` of `out_dir` while sampling it: yields None when this process holds it, else the live
    holder's claim ({worker, host, pid, since}), and then the shard is left to that holder.

    The claim is a file `.FILE.claim` taken under a lock, refreshed by a heartbeat thread every lease_s / 4 and
    removed on exit; a holder killed (even by SIGKILL) leaves a stale claim that the next worker takes over: its
    pid is gone (same host) or its heartbeat older than lease_s (another host). The shard itself is written
    atomically (write_shard), so a dead holder leaves no half-written shard, only one to redo.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f".{file}.claim"
    me = {"worker": worker_id(), "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    with open(out_dir / ".claims.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            holder = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            holder = None
        live = holder is not None and _claim_live(holder, path, lease_s)
        if not live:
            write_json_atomic(path, me)
    if live:
        yield holder
        return
    for pattern in (f".{file}.*.tmp", f"..{file}.claim.*.tmp"):  # a dead holder's partial writes: never a shard
        for left in out_dir.glob(pattern):
            left.unlink(missing_ok=True)
    stop = threading.Event()

    def beat():  # until released, or until the claim is no longer ours (taken over after a stall)
        while not stop.wait(lease_s / 4):
            try:
                if json.loads(path.read_text()) != me:  # floats survive JSON exactly
                    return
                os.utime(path)
            except (FileNotFoundError, json.JSONDecodeError):
                return

    threading.Thread(target=beat, daemon=True, name=f"claim-{file}").start()
    try:
        yield None
    finally:
        stop.set()
        with open(out_dir / ".claims.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if json.loads(path.read_text()) == me:
                    path.unlink()
            except (FileNotFoundError, json.JSONDecodeError):
                pass
