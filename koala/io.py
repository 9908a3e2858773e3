"""Small file helpers shared by the modules that write to disk: hashing and atomic writes."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Raises:
        KoalaError: the file exists but may not be read (its permissions); other OSErrors pass through.
    """
    h = hashlib.sha256()
    try:
        f = open(path, "rb")
    except PermissionError:
        from koala.errors import KoalaError

        raise KoalaError(f"{path} may not be read (permission denied): give this user read access "
                         f"(chmod u+r {path}) or run as its owner") from None
    with f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_safetensors(path: str | Path) -> None:
    """A safetensors file is whole: its header parses and the file is as long as the header says (a truncated copy
    is refused before anything loads it).

    Raises:
        KoalaError: naming the file and the fix.
    """
    from koala.errors import KoalaError

    p = Path(path)
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the header needs {8 + n + end}")
    except (ValueError, KeyError, TypeError) as e:
        raise KoalaError(f"{p} is truncated or damaged ({e}): copy it again, or retrain") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


DIGEST_CHARS = 16  # 64 bits: the cache keys and fingerprints of one machine's or one run's files never collide


def digest(*parts) -> str:
    """The short name of what `parts` describe (a cache entry, a training): sha256 of their canonical JSON (sorted
    keys; other objects by str), DIGEST_CHARS hex characters. Every cache key and fingerprint in koala is one.

    Identities stored inside datasets (prompt ids, sample ids, settings hashes) keep the lengths they were written
    with, so that datasets made by earlier versions stay readable and extendable (koala.data).
    """
    blob = json.dumps(parts[0] if len(parts) == 1 else list(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS]


STALE_TMP_S = 24 * 3600  # a temporary sibling from another host (or an unnamed writer) this old is abandoned


def tmp_prefix(final: Path) -> str:
    """`.NAME.HOST-PID-`: a temporary sibling says who writes it, so a later run can tell a dead writer's leftovers."""
    import socket

    return f".{final.name}.{socket.gethostname()}-{os.getpid()}-"


def sweep_stale_tmp(final: Path) -> None:
    """Remove temporary siblings of `final` (`.NAME.*.tmp`) that a killed writer left: on this host those whose
    process is gone, from elsewhere those older than STALE_TMP_S."""
    import shutil
    import socket
    import time

    host = socket.gethostname()
    for left in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        writer = left.name[len(final.name) + 2:].rsplit("-", 2)  # [HOST, PID, random.tmp]
        try:
            if len(writer) == 3 and writer[0] == host and writer[1].isdigit():
                if _alive(int(writer[1])):
                    continue
            elif time.time() - left.lstat().st_mtime < STALE_TMP_S:
                continue
            shutil.rmtree(left) if left.is_dir() and not left.is_symlink() else left.unlink()
        except OSError:
            pass  # gone already, or not ours to remove: harmless


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if need be) for the block: one process at a time makes what the
    others then read (a download, a conversion); released when the block ends or the process dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    An interrupted write (exception, SIGKILL, disk full) never leaves a file under the final name that looks
    complete: either the old file is still there or the new one is, whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(final)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; put it in place of `final` only if the block succeeds.

    A drafter is several files (weights, config, tokenizer, draft vocabulary): written into the temporary directory
    and renamed, it is never seen half-written. An earlier `final` is replaced whole (moved aside, then removed).
    """
    import shutil
    import signal

    from koala.errors import KoalaError
    from koala.interrupt import fault

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an earlier swap killed after it finished leaves the replaced copy behind: final is whole
        for left in final.parent.glob(f".{final.name}.old-*"):
            shutil.rmtree(left, ignore_errors=True)
    sweep_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        try:
            yield tmp
        except KoalaError:
            raise
        except Exception as e:  # noqa: BLE001 - a full disk is OSError, torch's RuntimeError or safetensors' own
            why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise KoalaError(f"could not write {final} ({why}): free disk space and run again; "
                             f"{'the previous one is kept' if final.exists() else 'nothing was put in its place'}") \
                from None
        fault("drafter.rename")  # the fault campaign's kill point: written whole, not yet in place
        old = final.with_name(f".{final.name}.old-{os.getpid()}") if final.exists() else None
        # the two renames are not interrupted by SIGINT/SIGTERM: final is always one whole drafter
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_json(path: Path, compute, parse=lambda d: d, refresh: bool = False) -> dict:
    """A measurement cached as JSON at `path`: read back (through `parse`, which may raise on a damaged entry) unless
    `refresh`, else `compute()`d and written; the result says which with "cached". A read-only cache costs a
    re-measurement next time, nothing else."""
    if path.exists() and not refresh:
        try:
            return {**parse(json.loads(path.read_text())), "cached": True}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable or damaged entry: measure again
    data = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        pass
    return {**data, "cached": False}


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
