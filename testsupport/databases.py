"""Throw-away databases for tests, benchmarks and the integration suite.

`provision_database("sqlite")` makes a migrated SQLite file in a temporary folder;
`provision_database("postgresql")` creates a fresh database *and* a fresh login role on the server of
`MAITENANT_TEST_PG_URL` (default `postgresql://postgres@127.0.0.1:5432/test`), migrates it as the
admin, and hands back a URL that connects as the non-owner role, so row-level security is really in
force. Both are dropped on exit; nothing depends on leftovers.

`leg_database` is the session fixtures' version for the test legs (`MAITENANT_TEST_DB`): without a
PostgreSQL server it fails in CI, where the leg must run, and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from isolation.db import parse_database_url
from isolation.migrate import upgrade

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server answers at the admin URL."""


@dataclass(frozen=True)
class ProvisionedDatabase:
    kind: str
    url: str  # what the application uses (non-owner role on PostgreSQL)
    admin_url: str  # the owner's URL (migrations, benchmarks' baselines)
    app_role: str | None


def admin_url() -> str:
    return os.environ.get("MAITENANT_TEST_PG_URL", DEFAULT_ADMIN_URL)


def postgres_available(url: str | None = None) -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    import psycopg

    try:
        with psycopg.connect(_conninfo(url or admin_url()), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure to connect means "unavailable", with the reason shown
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def _conninfo(url: str) -> str:
    parsed = parse_database_url(url)
    return " ".join(f"{k}={v}" for k, v in (parsed.params or {}).items())


def _with_db_and_user(url: str, dbname: str, user: str | None) -> str:
    parsed = parse_database_url(url)
    p = dict(parsed.params or {})
    host = p.get("host", "127.0.0.1")
    port = p.get("port", 5432)
    who = user or p.get("user", "postgres")
    password = f":{p['password']}" if user is None and p.get("password") else ""
    return f"postgresql://{who}{password}@{host}:{port}/{dbname}"


@contextmanager
def provision_database(kind: str, *, keep: bool = False) -> Iterator[ProvisionedDatabase]:
    """A migrated, empty database of `kind` ("sqlite" or "postgresql"), removed afterwards."""
    if kind == "sqlite":
        folder = tempfile.mkdtemp(prefix="maitenant-")
        url = f"sqlite:///{folder}/maitenant.db"
        upgrade(url)
        try:
            yield ProvisionedDatabase("sqlite", url, url, None)
        finally:
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database kind {kind!r}")
    import psycopg
    from psycopg import sql

    base = admin_url()
    reason = postgres_available(base)
    if reason:
        raise PostgresUnavailable(f"PostgreSQL at {base} is not reachable ({reason})")
    suffix = secrets.token_hex(4)
    dbname, role = f"mt_test_{suffix}", f"mt_app_{suffix}"
    with psycopg.connect(_conninfo(base), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    owner_url = _with_db_and_user(base, dbname, None)
    try:
        upgrade(owner_url, app_role=role)
        yield ProvisionedDatabase("postgresql", _with_db_and_user(base, dbname, role), owner_url, role)
    finally:
        if not keep:
            with psycopg.connect(_conninfo(base), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@contextmanager
def leg_database(kind: str, *, in_ci: bool) -> Iterator[ProvisionedDatabase]:
    """`provision_database(kind)` for a test session; no PostgreSQL server: `pytest.fail` in CI (the
    leg must run there), `pytest.skip` with the reason elsewhere."""
    import pytest

    try:
        with provision_database(kind) as database:
            yield database
    except PostgresUnavailable as exc:
        if in_ci:
            pytest.fail(f"PostgreSQL leg needs a server: {exc}")
        pytest.skip(f"PostgreSQL leg skipped: {exc}")


def table_counts(database: ProvisionedDatabase) -> dict[str, dict[str, int]]:
    """Rows per tenant in every tenant table (plus `tenants`), read as the owner so RLS is bypassed.

    Used to prove that cleanup and runs leave other tenants' data exactly as it was.
    """
    from isolation.models import TENANT_TABLES

    queries = {table: f"SELECT tenant_id, COUNT(*) FROM {table} GROUP BY tenant_id" for table in TENANT_TABLES}
    queries["tenants"] = "SELECT id, COUNT(*) FROM tenants GROUP BY id"
    result: dict[str, dict[str, int]] = {}
    if database.kind == "sqlite":
        import sqlite3

        path = parse_database_url(database.admin_url).path
        with sqlite3.connect(path) as conn:
            for table, query in queries.items():
                result[table] = {t: n for t, n in conn.execute(query).fetchall()}
        return result
    import psycopg

    with psycopg.connect(_conninfo(database.admin_url)) as conn:
        for table, query in queries.items():
            result[table] = {t: n for t, n in conn.execute(query).fetchall()}
    return result


def tenant_row_counts(database: ProvisionedDatabase, tenant_id: str) -> dict[str, int]:
    """Rows of one tenant per table (0 where it has none)."""
    return {table: per_tenant.get(tenant_id, 0) for table, per_tenant in table_counts(database).items()}
