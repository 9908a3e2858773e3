"""The layout's rules, checked on the source: the library never reaches up into orchestration, and stays readable."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "koala").rglob("*.py"))
UPWARD = ("prefect", "mlflow", "flows", "tasks", "koala_flows", "koala_tasks")


def _imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module.split(".")[0])
    return out


def test_the_library_imports_no_orchestration_and_mlflow_only_in_tracking():
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & set(UPWARD)) for p in LIBRARY}
    bad = {k: v for k, v in bad.items() if v and k != "koala/tracking.py"}
    assert not bad, bad
    assert _imports(ROOT / "koala" / "tracking.py") & set(UPWARD) == {"mlflow"}


def test_no_function_in_the_library_is_longer_than_60_lines():
    long = [(str(p.relative_to(ROOT)), n.name, n.end_lineno - n.lineno + 1) for p in LIBRARY
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_library_commands_load_neither_prefect_nor_mlflow():
    code = ("import sys, koala.cli, koala.engine.session, koala.training.recipes, koala.evaluate; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'koala_flows'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_profiles_ship_inside_the_package():
    from koala.config import CONFIG_DIR, PROFILES, load_config

    assert CONFIG_DIR.parent == ROOT / "koala"
    for name in PROFILES:
        load_config(name)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _koala_imports(path: Path, known: set[str]) -> set[str]:
    """The koala modules a file imports, at the top or inside a function (a lazy import is still a dependency)."""
    name, out = _module(path), set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = name.split(".")[: len(name.split(".")) - n.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([n.module] if n.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in n.names}
    return {m for m in out if m in known and m != name}


def test_no_import_cycle_inside_the_library():
    graph = {_module(p): set() for p in LIBRARY}
    for p in LIBRARY:
        graph[_module(p)] = _koala_imports(p, set(graph))
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])
