"""Every bad input gives one line naming it and the fix, a non-zero exit, and changes nothing on disk."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from koala_flows.cli import app
from tests.bad_inputs import CASES, prepare, snapshot


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    prepare(d)
    return d


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(name, argv, pattern, broken, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before, cache_before = snapshot(tmp_path), snapshot(broken)
    r = CliRunner().invoke(app, [a.replace("{d}", str(broken)) for a in argv])
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert r.exit_code != 0, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no other exception escaped
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(tmp_path) == before and snapshot(broken) == cache_before


def test_there_are_at_least_thirty():
    assert len(CASES) >= 30


@pytest.mark.parametrize("argv", [["prompts", "--source", "mtbench", "--limit", "1"], ["assets", "fetch", "mtbench"],
                                  ["generate", "hi"]])
def test_a_cache_that_is_a_file_is_one_line(argv, tmp_path, monkeypatch):
    """KOALA_CACHE naming a file: one line naming it and the fix, whatever the command, and the file untouched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cachefile").write_text("not a directory\n")
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "cachefile"))
    before = snapshot(tmp_path)
    r = CliRunner().invoke(app, argv)
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert r.exit_code != 0 and len(lines) == 1, r.output
    assert re.search(r"error: the cache .*cachefile \(\$KOALA_CACHE\) is a file, not a directory: point KOALA_CACHE",
                     lines[0]), lines[0]
    assert snapshot(tmp_path) == before
