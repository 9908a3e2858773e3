"""Atomic writes: a dead writer's temporary siblings are removed by the next write, a live one's never; an unreadable
file is named in one line."""

import os
import socket
import subprocess
import sys
import time

import pytest

from koala.errors import KoalaError
from koala.io import STALE_TMP_S, atomic_dir, atomic_path, sha256_file, sweep_stale_tmp


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_writers_leftovers_go_a_live_ones_stay(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.{host}-{_dead_pid()}-abc.tmp"
    dead.mkdir()
    (dead / "weights").write_text("half")
    live = tmp_path / f".out.{host}-{os.getpid()}-def.tmp"
    live.write_text("being written")
    foreign_new = tmp_path / ".out.otherhost-1-ghi.tmp"
    foreign_new.write_text("another host, recent")
    foreign_old = tmp_path / ".out.otherhost-2-jkl.tmp"
    foreign_old.write_text("another host, abandoned")
    old = time.time() - STALE_TMP_S - 60
    os.utime(foreign_old, (old, old))
    sweep_stale_tmp(tmp_path / "out")
    assert not dead.exists() and not foreign_old.exists()
    assert live.exists() and foreign_new.exists()


def test_atomic_writes_sweep_before_writing(tmp_path):
    stale = tmp_path / f".report.json.{socket.gethostname()}-{_dead_pid()}-x.tmp"
    stale.write_text("{")
    with atomic_path(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and (tmp_path / "report.json").read_text() == "{}"
    stale_dir = tmp_path / f".drafter.{socket.gethostname()}-{_dead_pid()}-y.tmp"
    stale_dir.mkdir()
    with atomic_dir(tmp_path / "drafter") as d:
        (d / "config.json").write_text("{}")
    assert not stale_dir.exists() and (tmp_path / "drafter" / "config.json").exists()


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch):
    f = tmp_path / "shard-00000.parquet"
    f.write_bytes(b"x")
    real_open = open

    def refuse(path, *a, **k):  # as mode 000 does for anyone but root
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(KoalaError, match=r"shard-00000.parquet may not be read \(permission denied\): give this user "
                                         r"read access \(chmod u\+r"):
        sha256_file(f)


def test_a_file_lock_holds_another_process_off_until_it_is_released(tmp_path):
    """Two processes that would make the same thing (a download, a conversion): the second waits for the first."""
    from koala.io import file_lock

    log = tmp_path / "log"
    code = ("import sys, time; from koala.io import file_lock\n"
            "with file_lock(sys.argv[1]):\n"
            "    open(sys.argv[2], 'a').write('held\\n'); time.sleep(1.0); open(sys.argv[2], 'a').write('released\\n')\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".x.lock"), str(log)])
    try:
        end = time.time() + 60
        while not (log.exists() and "held" in log.read_text()) and time.time() < end:
            time.sleep(0.02)
        with file_lock(tmp_path / ".x.lock"):
            assert log.read_text() == "held\nreleased\n"
    finally:
        child.wait(timeout=60)
