"""Signals and atomic writes: the first signal always stops, and a drafter is never seen half-written."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import save_file

from koala import interrupt
from koala.errors import KoalaError
from koala.io import atomic_dir


@pytest.fixture
def clean_state():
    interrupt.STOP.clear()
    interrupt._received.clear()
    yield
    interrupt.STOP.clear()
    interrupt._received.clear()
    interrupt.IN_FLOW.clear()


def test_the_first_signal_stops_even_when_the_watcher_thread_saw_it_first(clean_state):
    interrupt.STOP.set()  # the wakeup-fd watcher usually wins the race against the Python handler
    with pytest.raises(SystemExit) as e:
        interrupt._handler(signal.SIGTERM, None)
    assert e.value.code == 143


def test_inside_a_flow_the_first_signal_is_a_keyboard_interrupt(clean_state):
    interrupt.IN_FLOW.set()
    with pytest.raises(KeyboardInterrupt):
        interrupt._handler(signal.SIGINT, None)
    assert interrupt.exit_code() == 130


def test_work_checks_stop_between_units(clean_state):
    interrupt.check()
    interrupt.STOP.set()
    with pytest.raises(interrupt.Interrupted, match="run the same command again"):
        interrupt.check()


def test_a_failed_drafter_write_is_one_line_and_keeps_the_previous(tmp_path):
    final = tmp_path / "drafter"
    with atomic_dir(final) as d:
        save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))
    before = (final / "model.safetensors").read_bytes()
    with pytest.raises(KoalaError, match="could not write .*drafter .*free disk space.*previous one is kept"):
        with atomic_dir(final) as d:
            (d / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert (final / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["drafter"]  # no temporary directory left


def test_injected_faults_raise_where_asked(clean_state, monkeypatch):
    monkeypatch.setenv("KOALA_FAULT", "here:2:enospc")
    interrupt._counts.clear()
    interrupt.fault("here")
    interrupt.fault("elsewhere")
    with pytest.raises(OSError, match="No space left"):
        interrupt.fault("here")
