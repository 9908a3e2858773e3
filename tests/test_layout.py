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
