"""Database connection from `DATABASE_URL`, and the per-transaction tenant binding.

* SQLite (default, embedded): WAL, foreign keys on, a busy timeout; writes take `BEGIN IMMEDIATE`
  so concurrent writers queue on the busy timeout instead of failing on a lock upgrade.
* PostgreSQL: pooled psycopg 3 connections that `SET ROLE` to the application role, so row-level
  security applies; every scoped statement runs in a transaction that first calls
  `set_config('app.tenant_id', <tenant>, true)` (transaction-local, gone at commit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from peewee import Database, DatabaseProxy, SqliteDatabase, __exception_wrapper__, _savepoint
from playhouse.pool import PooledPostgresqlDatabase

from isolation.config import get_database_settings

database = DatabaseProxy()


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed `DATABASE_URL`."""

    dialect: str  # "sqlite" | "postgresql"
    path: str | None = None  # SQLite file path (":memory:" allowed)
    params: dict | None = None  # PostgreSQL connect parameters

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"


def parse_database_url(url: str) -> DatabaseURL:
    """Parse `sqlite:///relative.db`, `sqlite:////abs.db` or `postgresql://user@host:port/db`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :]) if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"sqlite URL needs a path, e.g. sqlite:///data/maitenant.db (got {url!r})")
        return DatabaseURL("sqlite", path=path)
    if scheme in {"postgres", "postgresql", "postgresql+psycopg"}:
        if not parts.path.strip("/"):
            raise ValueError(f"postgresql URL needs a database name (got {url!r})")
        params: dict = {"dbname": unquote(parts.path.lstrip("/"))}
        if parts.hostname:
            params["host"] = parts.hostname
        if parts.port:
            params["port"] = parts.port
        if parts.username:
            params["user"] = unquote(parts.username)
        if parts.password:
            params["password"] = unquote(parts.password)
        params.update(dict(parse_qsl(parts.query)))
        return DatabaseURL("postgresql", params=params)
    raise ValueError(f"unsupported DATABASE_URL scheme {scheme!r}: use sqlite:/// or postgresql://")


class _TenantTrackingSavepoint(_savepoint):
    """`ROLLBACK TO SAVEPOINT` also undoes a `set_config` made inside it: forget the binding."""

    def rollback(self, begin=True):
        self.db._state.bound_tenant = None
        super().rollback(begin)


class _AppRolePostgresqlDatabase(PooledPostgresqlDatabase):
    """Pooled PostgreSQL whose every new connection switches to the non-owner application role.

    It also remembers which tenant the current transaction is bound to, so a request that makes
    several scoped calls binds once, and it sends `BEGIN` together with the binding in one round
    trip. Commit, rollback and savepoint rollback forget the binding (PostgreSQL undoes it there).
    """

    def __init__(self, *args, app_role: str | None = None, **kwargs) -> None:
        self.app_role = app_role
        super().__init__(*args, **kwargs)

    def _connect(self):
        conn = super()._connect()
        if self.app_role:
            from psycopg import sql

            with conn.cursor() as cursor:
                cursor.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.app_role)))
        return conn

    def begin(self, isolation_level=None):
        pending = getattr(self._state, "pending_tenant", None)
        self._state.pending_tenant = None
        self._state.bound_tenant = None
        if pending is None or isolation_level is not None:
            return super().begin(isolation_level)
        from psycopg import sql

        # No parameters: psycopg sends this with the simple query protocol, both statements at once.
        statement = sql.SQL("BEGIN; SELECT set_config('app.tenant_id', {}, true)").format(sql.Literal(pending))
        with __exception_wrapper__:
            self.cursor().execute(statement)
        self._state.bound_tenant = pending

    def commit(self):
        self._state.bound_tenant = None
        return super().commit()

    def rollback(self):
        self._state.bound_tenant = None
        return super().rollback()

    def savepoint(self):
        return _TenantTrackingSavepoint(self)

    def bind(self, tenant_id: str) -> None:
        if self.in_transaction() and getattr(self._state, "bound_tenant", None) == tenant_id:
            return
        self.execute_sql("SELECT set_config('app.tenant_id', %s, true)", (tenant_id,))
        self._state.bound_tenant = tenant_id if self.in_transaction() else None


def _sqlite(path: str, busy_timeout_ms: int) -> SqliteDatabase:
    if path != ":memory:":
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
    return SqliteDatabase(
        path,
        pragmas={
            "journal_mode": "wal",
            "foreign_keys": 1,
            "busy_timeout": busy_timeout_ms,
            "synchronous": "normal",
        },
        timeout=busy_timeout_ms / 1000,
    )


def make_database(url: str, *, app_role: str | None = None, admin: bool = False) -> Database:
    """A peewee database for `url`. `admin=True` keeps the URL's own role (for migrations)."""
    settings = get_database_settings()
    parsed = parse_database_url(url)
    if not parsed.is_postgres:
        return _sqlite(parsed.path or "", settings.sqlite_busy_timeout_ms)
    if admin:
        from peewee import PostgresqlDatabase

        return PostgresqlDatabase(parsed.params.pop("dbname"), prefer_psycopg3=True, **parsed.params)
    params = dict(parsed.params)
    return _AppRolePostgresqlDatabase(
        params.pop("dbname"),
        app_role=app_role if app_role is not None else settings.database_app_role,
        prefer_psycopg3=True,
        max_connections=settings.database_pool_size,
        stale_timeout=300,
        timeout=10,
        **params,
    )


def configure(url: str | None = None, *, app_role: str | None = None) -> Database:
    """Point the shared `database` proxy at `url` (default: settings) and return the real database."""
    if database.obj is not None and not database.obj.is_closed():
        database.obj.close()
    if database.obj is not None and hasattr(database.obj, "close_all"):
        database.obj.close_all()
    real = make_database(url or get_database_settings().database_url, app_role=app_role)
    database.initialize(real)
    return real


def is_postgres() -> bool:
    """Whether the configured database is PostgreSQL (row-level security active)."""
    return isinstance(database.obj, PooledPostgresqlDatabase)


def _require_configured() -> Database:
    if database.obj is None:
        configure()
    return database.obj


@contextmanager
def read_transaction() -> Iterator[None]:
    """A transaction for reads (or a no-op when one is already open)."""
    db = _require_configured()
    with db.atomic():
        yield


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction for writes: `BEGIN IMMEDIATE` on SQLite when it is the outermost one."""
    db = _require_configured()
    if isinstance(db, SqliteDatabase) and not db.in_transaction():
        with db.atomic("IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield


def bind_tenant(tenant_id: str) -> None:
    """Set the tenant of the current PostgreSQL transaction for row-level security (no-op on SQLite).

    Must be called inside a transaction: `set_config(..., true)` ends with it, so a pooled connection
    never carries one tenant's setting into another's work.
    """
    db = _require_configured()
    if isinstance(db, _AppRolePostgresqlDatabase):
        db.bind(tenant_id)
    elif isinstance(db, PooledPostgresqlDatabase):
        db.execute_sql("SELECT set_config('app.tenant_id', %s, true)", (tenant_id,))


@contextmanager
def tenant_transaction(tenant_id: str, *, write: bool = False) -> Iterator[None]:
    """A transaction bound to `tenant_id` (on PostgreSQL: `BEGIN` and the binding in one round trip).

    Nested inside an open transaction it binds (once per transaction) and, for writes, opens a
    savepoint.
    """
    db = _require_configured()
    if not write and db.in_transaction():  # a read inside a transaction needs no savepoint
        bind_tenant(tenant_id)
        yield
        return
    tracking = isinstance(db, _AppRolePostgresqlDatabase)
    if tracking and not db.in_transaction():
        db._state.pending_tenant = tenant_id
    try:
        with write_transaction() if write else read_transaction():
            bind_tenant(tenant_id)
            yield
    finally:
        if tracking:
            db._state.pending_tenant = None
