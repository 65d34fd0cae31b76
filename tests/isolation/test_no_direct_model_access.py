"""Only `isolation/` may touch the models: everything else goes through the scoped managers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("configurator", "replier", "integration_tests", "perf", "tasks.py", "noxfile.py")
ALLOWED = {"perf/bench_isolation.py"}  # its unscoped baseline query is the point of the comparison


def _python_files():
    for entry in CHECKED:
        path = ROOT / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from path.rglob("*.py")


def _called_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def model_imports(source: str) -> list[str]:
    """Every import of `isolation.models` (or of `models` from `isolation`) in a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("isolation.models")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("isolation.models"):
                found.append(module)
            elif module == "isolation" and any(a.name == "models" for a in node.names):
                found.append("isolation.models")
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in {"__import__", "import_module"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and "isolation.models" in str(node.args[0].value)
        ):
            found.append(str(node.args[0].value))
    return found


def test_detector_catches_every_import_form():
    assert model_imports("import isolation.models")
    assert model_imports("from isolation.models import Agent")
    assert model_imports("from isolation import models")
    assert model_imports("import importlib; importlib.import_module('isolation.models')")
    assert not model_imports("from isolation import Scoped")


def test_no_module_outside_isolation_imports_the_models():
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in _python_files()
        if str(path.relative_to(ROOT)) not in ALLOWED and (hits := model_imports(path.read_text()))
    }
    assert offenders == {}
