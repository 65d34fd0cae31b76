"""Only the managers (and the few pre-tenant modules) touch the models; hand-written SQL has one home.

Outside `isolation/` nothing imports the models: application code goes through the scoped managers.
Inside, only the modules listed in `MODEL_MODULES` do. Statements written by hand (`execute_sql`)
live in `isolation/managers/sql.py` for tenant data, plus the connection's own set-up in `db.py`,
the pre-tenant `SECURITY DEFINER` lookups in `system.py` and the schema migrations.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("configurator", "replier", "integration_tests", "perf", "testsupport", "tasks.py", "noxfile.py")
ALLOWED = {
    "perf/bench_isolation.py",  # its unscoped baseline query is the point of the comparison
    "testsupport/databases.py",  # counts every tenant table's rows as the owner (TENANT_TABLES)
}


# Inside `isolation/`: the modules that may import the models (everything else uses the managers).
MODEL_MODULES = {
    "isolation/models.py",
    "isolation/managers/base.py",
    "isolation/managers/tenancy.py",
    "isolation/managers/agents.py",
    "isolation/managers/chat.py",
    "isolation/managers/sql.py",
    "isolation/system.py",  # pre-tenant lookups (accounts, API keys, templates)
    "isolation/cleanup.py",  # deletes table by table, children first
    "isolation/operators.py",  # reads across tenants for operators and limits (SECURITY DEFINER)
}
# Where `execute_sql` may appear in the runtime packages this suite guards.
SQL_MODULES = {
    "isolation/managers/sql.py",  # every hand-written statement on tenant tables
    "isolation/db.py",  # the tenant binding, the health ping
    "isolation/system.py",  # SECURITY DEFINER lookups before a tenant is known
    "isolation/migrate.py",
    "isolation/health.py",  # /health: SELECT 1, BEGIN IMMEDIATE/ROLLBACK, txid_current(); no table
    "isolation/operators.py",  # SECURITY DEFINER reads across tenants, marking operators as the owner
}


def _python_files(entries=CHECKED):
    for entry in entries:
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


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_inside_isolation_only_the_managers_and_pre_tenant_modules_import_the_models():
    modules = {_relative(path) for path in (ROOT / "isolation").rglob("*.py")}
    assert modules >= MODEL_MODULES, "MODEL_MODULES names a module that does not exist"
    importers = {_relative(path) for path in (ROOT / "isolation").rglob("*.py") if model_imports(path.read_text())}
    assert importers - MODEL_MODULES == set()


def sql_calls(source: str) -> int:
    """How many `execute_sql(...)` calls a module makes."""
    return sum(
        1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and _called_name(node.func) == "execute_sql"
    )


def test_hand_written_sql_lives_in_the_reviewed_modules():
    assert sql_calls("db.execute_sql('SELECT 1')") == 1 and sql_calls("db.execute('x')") == 0
    offenders = {
        _relative(path)
        for path in _python_files(("isolation", "configurator"))
        if "migrations" not in path.parts and _relative(path) not in SQL_MODULES and sql_calls(path.read_text())
    }
    assert offenders == set()
