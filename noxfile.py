"""Test environments and stages (nox). Operations live in tasks.py (invoke).

    nox                      lint + every test stage on SQLite, then the coverage gate
    nox -t ci                the same on SQLite *and* PostgreSQL (what .ci/run runs)
    nox -s "unit(postgresql)" -- -k agents      one leg, extra pytest arguments after --

A `nox` run with test stages first erases the coverage data of earlier runs, so the gate counts
only the stages of the latest such run: an interrupted run, or a PostgreSQL leg that ran once and is
skipped now, cannot leak into it (re-running `nox -t ci` locally starts from nothing).

The PostgreSQL legs create their own database and role on MAITENANT_TEST_PG_URL (default
postgresql://postgres@127.0.0.1:5432/test) and drop them afterwards. When that server is not
reachable the leg is skipped with the reason, except with CI=true, where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint",
    "unit(sqlite)",
    "isolation(sqlite)",
    "integration(sqlite)",
    "coverage",
]

ROOT = Path(__file__).parent
DATABASES = nox.parametrize("database", ["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
IN_CI = os.environ.get("CI", "").lower() == "true"
_COVERAGE_ERASED = False  # one `nox` run is one Python process: its first test stage erases old data


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


def _fresh_coverage(session: nox.Session) -> None:
    """`coverage erase` once per `nox` run, before its first test stage: data left by an earlier run
    (an interrupted one, or a leg this run skips) must not count towards this run's gate."""
    global _COVERAGE_ERASED
    if _COVERAGE_ERASED:
        return
    # COVERAGE_FILE=.coverage with `parallel = true`: erases `.coverage` and every `.coverage.*`.
    session.run("coverage", "erase", env={"COVERAGE_FILE": str(ROOT / ".coverage")})
    _COVERAGE_ERASED = True


def _require_database(session: nox.Session, database: str) -> None:
    """Skip (locally) or fail (CI) a PostgreSQL leg whose server is unreachable."""
    if database != "postgresql":
        return
    # `python -c` from the repository root (nox's working directory): testsupport is importable there
    # without being installed (it is not in the wheel).
    reason = session.run(
        "python",
        "-c",
        "from testsupport.databases import postgres_available as p; print(p() or '')",
        silent=True,
    )
    reason = (reason or "").strip()
    if reason:
        message = f"PostgreSQL leg needs a server at MAITENANT_TEST_PG_URL: {reason}"
        if IN_CI:
            session.error(message)
        session.skip(message)


def _pytest(session: nox.Session, database: str, *paths: str, name: str) -> None:
    """Run pytest under coverage for one stage and one database leg."""
    _install(session)
    _fresh_coverage(session)
    _require_database(session, database)
    env = {
        "MAITENANT_TEST_DB": database,
        "COVERAGE_FILE": str(ROOT / f".coverage.{name}-{database}"),
        "PYTHONUNBUFFERED": "1",
    }
    session.run("coverage", "run", "-m", "pytest", *paths, *session.posargs, env=env)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
@DATABASES
def unit(session: nox.Session, database: str) -> None:
    """Configurator and replier tests (real database, real servers on free ports)."""
    _pytest(session, database, "tests", "--ignore=tests/isolation", name="unit")


@nox.session(tags=["ci"])
@DATABASES
def isolation(session: nox.Session, database: str) -> None:
    """The isolation library: property-based, cross-tenant, RLS, cleanup, migrations."""
    _pytest(session, database, "tests/isolation", "--hypothesis-show-statistics", name="isolation")


@nox.session(tags=["ci"])
@DATABASES
def integration(session: nox.Session, database: str) -> None:
    """End-to-end: both backends booted as subprocesses, driven over HTTP and Socket.IO."""
    _pytest(session, database, "integration_tests", name="integration")


@nox.session(tags=["ci"])
def cluster(session: nox.Session) -> None:
    """Scale-out: PostgreSQL + Redis + HAProxy + 2 repliers + a 2-worker configurator (cluster_tests/).

    The same processes and balancer config as `invoke start-cluster`; it needs `haproxy` and Redis at
    MAITENANT_TEST_REDIS_URL (.ci/run installs and starts both). Skipped locally without them, failed
    with CI=true, like the PostgreSQL legs.
    """
    _pytest(session, "postgresql", "cluster_tests", name="cluster")


@nox.session(tags=["ci"])
def coverage(session: nox.Session) -> None:
    """Combine every stage's data (subprocess servers included) and enforce the gate."""
    session.install("coverage[toml]>=7.10")
    data = [str(p) for p in ROOT.glob(".coverage.*")]
    if not data:
        session.error("no coverage data: run the test stages first (e.g. `nox` or `nox -t ci`)")
    session.run("coverage", "combine", *data)
    session.run("coverage", "report")  # fails under `fail_under` (pyproject.toml)


@nox.session
def load(session: nox.Session) -> None:
    """Locust load suite against freshly started backends (not in the default run).

    nox -s load -- --database postgresql --users 50 --spawn-rate 10 --run-time 60s --max-p95-ms 500
    (see perf/load_run.py); reports go to reports/load/<timestamp>/.
    """
    _install(session)
    session.run("python", "-m", "perf.load_run", *session.posargs, env={"PYTHONUNBUFFERED": "1"})
