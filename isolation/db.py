"""Database connection from `DATABASE_URL`, and the one connection and transaction policy.

Every service goes through the public helpers here: `configure()` at start-up, `connection()` around
a request or a command, `unit_of_work(tenant, write=...)` around its statements (the dialect
decisions below are made there and nowhere else), `close_database()` at shutdown.

* SQLite (default, embedded): WAL, foreign keys on, a busy timeout; writes take `BEGIN IMMEDIATE`
  so concurrent writers queue on the busy timeout instead of failing on a lock upgrade.
* PostgreSQL: pooled psycopg 3 connections that run as the application role (a startup option of
  each connection), so row-level security applies; every scoped statement runs in a transaction
  that first calls `set_config('app.tenant_id', <tenant>, true)` (transaction-local, gone when it
  ends). A write transaction sends `BEGIN` and the binding with its first statement; a read outside
  any transaction sends each statement with its own binding in one pipeline (one implicit,
  read-only transaction), so it needs no `BEGIN`/`COMMIT` at all (docs/PERFORMANCE.md,
  docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from peewee import Database, DatabaseProxy, SqliteDatabase, __exception_wrapper__, _savepoint
from playhouse.pool import PooledDatabase, PooledPostgresqlDatabase

from isolation.config import get_base_settings

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


_BIND_SQL = "SELECT set_config('app.tenant_id', %s, true)"
# Sent ahead of each statement of a read outside a transaction, in the same implicit transaction.
_STATEMENT_BINDING = "SELECT set_config('app.tenant_id', %s, true), set_config('transaction_read_only', 'on', true)"


class _AppRolePostgresqlDatabase(PooledPostgresqlDatabase):
    """Pooled PostgreSQL whose every new connection switches to the non-owner application role.

    It also remembers which tenant the current transaction is bound to, so a request that makes
    several scoped calls binds once. `BEGIN` and the tenant binding are not sent on their own: they
    wait as the transaction's *prelude* and go out with its next statement in one psycopg pipeline
    (one round trip: `BEGIN`, `set_config`, the statement, in this order, and a statement after a
    failed one is not run). Every way to the server (`execute_sql`, `cursor()`) sends the prelude
    first, so no statement runs without the binding that precedes it. A transaction that sent
    nothing ends without a round trip. Commit, rollback and savepoint rollback forget the binding
    (PostgreSQL undoes it there).

    Handing out a pooled connection costs no round trip when it came back recently (`PING_AFTER_IDLE_SECONDS`):
    peewee's pool checks every connection with `SELECT 1` on check-out, while it holds the pool's lock,
    so every request paid one extra round trip and all threads queued behind it (docs/PERFORMANCE.md).
    """

    # A connection idle for longer than this is checked with `SELECT 1` before it is handed out (it
    # may have been cut by a restart or an idle timeout); one that came back sooner is handed out as
    # it is. If the server dropped it in that window, the request fails as in any outage (503, and the
    # fault handler drops the idle connections: isolation/faults.py), and the check-in discards it.
    PING_AFTER_IDLE_SECONDS = 1.0

    def __init__(self, *args, app_role: str | None = None, **kwargs) -> None:
        self.app_role = app_role
        if app_role:
            option = "-c role=" + app_role.replace("\\", "\\\\").replace(" ", "\\ ")  # libpq's escapes
            kwargs["options"] = f"{kwargs['options']} {option}" if kwargs.get("options") else option
        self._returned_at: dict[int, float] = {}  # conn_key -> time.monotonic() of its last check-in
        # `is_superuser` (reported by the server, for the current role) as a new connection starts.
        self._login_superuser: str | None = None
        super().__init__(*args, **kwargs)

    def _is_closed(self, conn) -> bool:
        from psycopg.pq import TransactionStatus

        if conn.closed:
            return True
        if self.app_role and conn.info.parameter_status("is_superuser") != self._login_superuser:
            # Someone left the application role on this connection (`SET ROLE NONE` with a superuser
            # login, say): never hand it out again; the pool opens a new one.
            self._close_raw(conn)
            return True
        returned_at = self._returned_at.get(self.conn_key(conn))
        if (
            returned_at is not None
            and time.monotonic() - returned_at < self.PING_AFTER_IDLE_SECONDS
            and conn.info.transaction_status == TransactionStatus.IDLE
        ):
            return False
        return super()._is_closed(conn)

    def _close(self, conn, close_conn=False):
        # Under the pool's (re-entrant) lock, as `_is_closed` is: recorded first, forgotten again by
        # `_close_raw` when the pool closes the connection instead of keeping it.
        with self._pool_lock:
            self._returned_at[self.conn_key(conn)] = time.monotonic()
            super()._close(conn, close_conn)

    def _close_raw(self, conn):
        self._returned_at.pop(self.conn_key(conn), None)
        super()._close_raw(conn)

    def _connect(self):
        # The pool's `_connect` hands out a pooled connection or opens a new one. The role is a
        # startup option of every new connection (`make_database`: `-c role=...`), so it costs no
        # round trip per check-out (a `SET ROLE` here ran on every request) and is also the role's
        # reset value: `RESET ROLE` leaves the connection in the application role.
        conn = super()._connect()
        if self.app_role and self._login_superuser is None:
            self._login_superuser = conn.info.parameter_status("is_superuser")
        return conn

    # -- the prelude: BEGIN and the binding, sent with the next statement ---------------------
    def _take_prelude(self) -> list[tuple[str, tuple | None]]:
        prelude = getattr(self._state, "prelude", None)
        if prelude:
            self._state.prelude = []
        return prelude or []

    def cursor(self, named_cursor=None):
        """A cursor, after the pending prelude was sent (direct cursor users such as `executemany`)."""
        cursor = super().cursor(named_cursor)
        prelude = self._take_prelude()
        if prelude:
            with __exception_wrapper__, self._state.conn.pipeline():
                for statement, params in prelude:
                    cursor.execute(statement, params)
        return cursor

    def _execute_cursor(self, sql, params, **cursor_options):
        tenant = getattr(self._state, "statement_tenant", None)
        if tenant is not None and not self.in_transaction():
            return self._execute_bound(tenant, sql, params, cursor_options)
        prelude = self._take_prelude()
        if not prelude:
            return super()._execute_cursor(sql, params, **cursor_options)
        self._log_query(sql, params)
        with __exception_wrapper__:
            cursor = super().cursor()
            with self._state.conn.pipeline():
                for statement, prelude_params in prelude:
                    cursor.execute(statement, prelude_params)
                cursor.execute(sql, params or ())
        return cursor

    def _execute_bound(self, tenant: str, sql, params, cursor_options: dict):
        """A read of `unit_of_work(tenant)` outside a transaction: the binding and the statement go in
        one pipeline that ends with one Sync, so PostgreSQL runs them as one implicit transaction
        (the binding, transaction-local, ends with it; nothing is left on the connection) that is
        read-only (a write here fails instead of committing on its own). One round trip, and the
        statement itself stays a server-side prepared one (psycopg's `prepare_threshold`)."""
        if cursor_options or self.query_hooks:
            # A named (server-side) cursor or a query hook cannot share the pipeline; never run them unbound.
            raise RuntimeError("this statement needs a transaction: run it in unit_of_work(tenant, write=True)")
        self._log_query(sql, params)
        with __exception_wrapper__:
            binding = super().cursor()
            cursor = super().cursor()
            with self._state.conn.pipeline():
                binding.execute(_STATEMENT_BINDING, (tenant,))
                cursor.execute(sql, params or ())
        return cursor

    def begin(self, isolation_level=None):
        pending = getattr(self._state, "pending_tenant", None)
        self._state.pending_tenant = None
        self._state.bound_tenant = None
        self._state.prelude = []
        if isolation_level is not None:
            return super().begin(isolation_level)
        if self.is_closed():  # connect now, as sending BEGIN would: connecting resets the transaction stack
            self.connect()
        self._state.prelude = [("BEGIN", None)]
        if pending is not None:
            self._state.prelude.append((_BIND_SQL, (pending,)))
            self._state.bound_tenant = pending

    def _end(self) -> bool:
        """Forget the binding and the prelude; whether the server has a transaction to end."""
        self._state.bound_tenant = None
        prelude = self._take_prelude()
        return not (prelude and prelude[0][0] == "BEGIN")

    def commit(self):
        if self._end():
            return super().commit()
        return None

    def rollback(self):
        if not self._end():
            return None
        conn = self._state.conn
        if conn is not None and conn.closed:
            # The connection was lost (its first statement found it cut, as no check-out round trip
            # tests it any more): the server ended the transaction with it, there is nothing to roll
            # back, and trying would bury the outage's own error under "the connection is closed".
            return None
        return super().rollback()

    def close(self):
        self._state.prelude = []
        return super().close()

    def savepoint(self):
        return _TenantTrackingSavepoint(self)

    def set_local(self, statement: str) -> None:
        """Run a transaction-local `SET LOCAL ...` with the transaction's next statement (prelude)."""
        if not self.in_transaction():
            raise RuntimeError("SET LOCAL needs an open transaction")
        prelude = getattr(self._state, "prelude", None)
        if prelude:
            prelude.append((statement, None))
        else:
            self.execute_sql(statement)

    def bind(self, tenant_id: str) -> None:
        in_transaction = self.in_transaction()
        if in_transaction and getattr(self._state, "bound_tenant", None) == tenant_id:
            return
        if not in_transaction:
            self.execute_sql(_BIND_SQL, (tenant_id,))
            self._state.bound_tenant = None
            return
        # Nothing ran since an unsent binding: it is replaced, only the last one counts.
        prelude = [item for item in getattr(self._state, "prelude", None) or [] if item[0] is not _BIND_SQL]
        prelude.append((_BIND_SQL, (tenant_id,)))
        self._state.prelude = prelude
        self._state.bound_tenant = tenant_id


class _SqliteDatabase(SqliteDatabase):
    """peewee's SQLite database, minus a ROLLBACK of a transaction SQLite has already ended."""

    def rollback(self):
        conn = self._state.conn
        if conn is not None and not conn.in_transaction:
            # SQLite ends the transaction itself on some errors (SQLITE_FULL: a COMMIT on a full disk,
            # SQLITE_IOERR, ...). A ROLLBACK then fails with "cannot rollback - no transaction is
            # active", chained on top of the real error: the wrong error first, and a second
            # traceback for every failure during an outage.
            return None
        return super().rollback()


def _sqlite(path: str, busy_timeout_ms: int) -> SqliteDatabase:
    if path != ":memory:":
        _create_private(path)
    return _SqliteDatabase(
        path,
        pragmas={
            "journal_mode": "wal",
            "foreign_keys": 1,
            "busy_timeout": busy_timeout_ms,
            "synchronous": "normal",
        },
        timeout=busy_timeout_ms / 1000,
    )


def _create_private(path: str) -> None:
    """Create a new SQLite file (and its folder) readable by its owner only.

    The file holds password hashes and encrypted LLM keys, and on SQLite the file's permissions are the
    only wall around them; SQLite gives its -wal and -shm files the database file's mode. Existing
    files and folders keep the permissions the operator chose.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def make_database(url: str, *, app_role: str | None = None, admin: bool = False) -> Database:
    """A peewee database for `url`. `admin=True` keeps the URL's own role (for migrations)."""
    settings = get_base_settings()
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
    """Point the shared `database` proxy at `url` (default: settings) and return the real database.

    A database configured before is closed first (`close_database`), pool and all.
    """
    close_database()
    real = make_database(url or get_base_settings().database_url, app_role=app_role)
    database.initialize(real)
    return real


def close_connection() -> None:
    """Close this thread's connection if it is open (a pooled one goes back to the pool)."""
    real = database.obj
    if real is not None and not real.is_closed():
        real.close()


def close_database() -> None:
    """Close this thread's connection and, for a pool, every pooled connection (at shutdown)."""
    real = database.obj
    if real is None:
        return
    close_connection()
    if isinstance(real, PooledDatabase):
        real.close_all()


def is_postgres() -> bool:
    """Whether the configured database is PostgreSQL (row-level security active)."""
    return isinstance(database.obj, PooledPostgresqlDatabase)


def _require_configured() -> Database:
    if database.obj is None:
        configure()
    return database.obj


@contextmanager
def connection() -> Iterator[None]:
    """This thread's connection for the enclosed work (a request, a command).

    On PostgreSQL it is closed afterwards, which hands it back to the pool. SQLite has no pool and
    opening costs a file open and four PRAGMAs (more than most queries), so each thread keeps its
    connection open between uses. When the thread already has one open (nested use), it is left to
    the outer block.
    """
    real = database.obj
    if real is None:
        raise RuntimeError("the database is not configured (isolation.db.configure() sets it up)")
    opened = real.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened and isinstance(real, PooledPostgresqlDatabase) and not real.is_closed():
            real.close()


def ping() -> None:
    """A trivial query on this thread's connection (health checks)."""
    with connection():
        database.obj.execute_sql("SELECT 1").fetchone()


def _bind(db: Database, tenant_id: str) -> None:
    if isinstance(db, _AppRolePostgresqlDatabase):
        db.bind(tenant_id)
    elif isinstance(db, PooledPostgresqlDatabase):
        db.execute_sql("SELECT set_config('app.tenant_id', %s, true)", (tenant_id,))


def bind_tenant(tenant_id: str) -> None:
    """Set the tenant of the current PostgreSQL transaction for row-level security (no-op on SQLite).

    Must be called inside a transaction: `set_config(..., true)` ends with it, so a pooled connection
    never carries one tenant's setting into another's work.
    """
    _bind(_require_configured(), tenant_id)


_ASYNCHRONOUS_COMMIT = "SET LOCAL synchronous_commit = off"


def commit_without_flush() -> None:
    """Let the current PostgreSQL transaction's COMMIT return before its WAL reaches the disk.

    `SET LOCAL synchronous_commit = off`: this transaction only (PostgreSQL resets it at its end),
    sent with the transaction's next statement (no round trip of its own). What that risks: a crash
    of PostgreSQL or of its host can lose transactions that committed up to about three
    `wal_writer_delay` (0.6 s by default) before it; never half of one, never corruption. A no-op on
    SQLite. Call it inside the transaction (`unit_of_work(write=True)`); the replier's store does
    when `CHAT_SYNCHRONOUS_COMMIT=off` (docs/RELIABILITY.md).
    """
    db = _require_configured()
    if isinstance(db, _AppRolePostgresqlDatabase):
        db.set_local(_ASYNCHRONOUS_COMMIT)
    elif isinstance(db, PooledPostgresqlDatabase):
        if not db.in_transaction():
            raise RuntimeError("SET LOCAL needs an open transaction")
        db.execute_sql(_ASYNCHRONOUS_COMMIT)


@contextmanager
def unit_of_work(tenant_id: str | None = None, *, write: bool = False) -> Iterator[None]:
    """The one transaction policy: the managers, the configurator's requests, the replier's store
    batches and the cleanup all open their database work with it.

    * `write=True`: a transaction; `BEGIN IMMEDIATE` on SQLite when it is the outermost one, so
      concurrent writers queue on the busy timeout instead of failing on a lock upgrade; nested, a
      savepoint (only the inner block rolls back on an error).
    * Reads on PostgreSQL with a tenant, outside a transaction: no transaction. Each statement is sent
      in one pipeline behind its own transaction-local binding (and `transaction_read_only`), so it
      runs in an implicit transaction of its own, bound and read-only: one round trip per statement
      instead of `BEGIN`, statements, `COMMIT`. Under READ COMMITTED each statement saw its own
      snapshot inside a transaction too, so a read loses no consistency by it. Inside an open
      transaction only the binding (once per transaction, no savepoint).
    * Other reads (SQLite, which has no row-level security, or no tenant): no `BEGIN`/`COMMIT`
      round; they run as they are, inside the enclosing transaction if there is one.

    With a tenant, PostgreSQL gets `BEGIN` and the binding in one round trip. Without one (work that
    binds per statement, like the replier's batches of several tenants, or tables without tenants
    such as accounts) nothing is bound.
    """
    db = _require_configured()
    postgres = isinstance(db, PooledPostgresqlDatabase)
    if not write:
        if not postgres or tenant_id is None:
            yield
            return
        if db.in_transaction():
            _bind(db, tenant_id)
            yield
            return
        if isinstance(db, _AppRolePostgresqlDatabase):
            # No transaction: every statement carries the binding (`_execute_cursor`).
            previous = getattr(db._state, "statement_tenant", None)
            db._state.statement_tenant = tenant_id
            try:
                yield
            finally:
                db._state.statement_tenant = previous
            return
    tracking = tenant_id is not None and isinstance(db, _AppRolePostgresqlDatabase) and not db.in_transaction()
    if tracking:
        db._state.pending_tenant = tenant_id  # picked up by `begin()`: BEGIN and the binding at once
    try:
        immediate = write and isinstance(db, SqliteDatabase) and not db.in_transaction()
        with db.atomic("IMMEDIATE") if immediate else db.atomic():
            if tenant_id is not None:
                _bind(db, tenant_id)
            yield
    finally:
        if tracking:
            db._state.pending_tenant = None
