"""The documentation: the site builds in strict mode, its reference covers the whole CLI and config, its figures come
from the committed results, and the project holds no lab notes."""

import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB_NOTES = re.compile(r"this session|previous session|session [0-9]", re.I)


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hooks():
    return _module("koala_docs_hooks_under_test", ROOT / "docs" / "hooks" / "koala_docs.py")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built the way `make docs` builds it: strict, so any warning fails."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_every_cli_command_and_option_is_in_the_reference(site, hooks):
    page = _text(site / "reference" / "cli.html")
    commands = hooks.cli_commands()
    assert {"koala eval", "koala run", "koala sample", "koala assets fetch", "koala export"} <= {p for p, _ in commands}
    for path, cmd in commands:
        assert path in page, f"{path} is missing from the CLI reference"
        for p in cmd.params:
            if p.name == "help":
                continue
            names = [*p.opts, *p.secondary_opts] if p.param_type_name == "option" else [p.name.upper()]
            for n in names:
                assert n in page, f"{path} {n} is missing from the CLI reference"


def test_every_config_field_is_in_the_reference_with_its_description(site, hooks):
    page = _text(site / "reference" / "config.html")
    fields = hooks.config_fields()
    assert len(fields) > 50 and "eval.gamma" in {n for n, _ in fields}
    for name, f in fields:
        assert name in page, f"config field {name} is missing from the reference"
        assert f.description, f"config field {name} has no description in koala/config.py"
        assert " ".join(f.description.split()) in page, f"{name}'s description is missing from the reference"


def test_every_bad_input_is_in_the_reliability_page(site):
    from tests.bad_inputs import CASES

    page = _text(site / "reliability" / "bad-inputs.html")
    for name, _, _ in CASES:
        assert name in page, name


def test_every_results_file_is_rendered_with_its_provenance(site):
    pages = "".join(_text(p) for p in (site / "benchmarks").glob("*.html")) + _text(site / "index.html")
    for f in sorted((ROOT / "bench" / "results").glob("*.json")):
        r = json.loads(f.read_text())
        assert r["command"] in pages, f"{f.name}: its command is on no benchmark page"
        assert r["date"][:10] in pages
    for png in ("acceptance.png", "trees.png", "dtype_curve.png"):
        assert (site / "benchmarks" / "plots" / png).stat().st_size > 1000


def test_an_orphaned_or_unlabelled_results_file_fails(tmp_path, monkeypatch):
    render = _module("koala_bench_render_under_test", ROOT / "bench" / "render.py")
    for f in (ROOT / "bench" / "results").glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    render.READ.clear()
    for table in render.TABLES.values():
        table()
    assert render.orphans() == []
    (tmp_path / "new_bench.json").write_text(json.dumps({"command": "python bench/x.py", "commit": "abc",
                                                         "date": "2027-01-01", "cpu": "a CPU"}))
    assert render.orphans() == ["new_bench.json"]
    (tmp_path / "decode.json").write_text(json.dumps({"command": "python bench/decode.py"}))
    with pytest.raises(ValueError, match="decode.json: lacks commit, date, cpu or gpu"):
        render.trees_table()


def test_the_readme_is_short_and_its_figures_are_the_results(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    render = _module("koala_bench_render_readme", ROOT / "bench" / "render.py")
    assert "<!-- bench:headline -->" in readme
    assert render.fill(readme) == readme, "README's figures differ from bench/results: run python bench/render.py --write"


def test_no_lab_notes_in_the_project():
    files = [ROOT / "README.md"] + [p for d in ("docs", "koala", "koala_flows", "koala_tasks", "bench") for p in (ROOT / d).rglob("*")
                                    if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".yml", ".json", ".sh")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if LAB_NOTES.search(line)]
    assert not hits, "\n".join(hits)
