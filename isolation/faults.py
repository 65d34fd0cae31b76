"""Which database errors are outages (retry later) rather than bugs: one classification for both backends.

A client must be able to tell "try again" from "this request is wrong" or "this is a bug". The
configurator turns a fault into HTTP 503 with `Retry-After`, the replier into a chat error with
`retryable: true`; both use `classify` so they agree on what counts:

* `database_unavailable`: PostgreSQL refuses or drops connections (server down or restarting, an
  administrator terminated the session, no new connections allowed, too many clients, a read-only
  server), the pool is exhausted, or SQLite is locked by another writer or cannot open its file;
* `storage_full`: the disk under the database is full (SQLite `SQLITE_FULL`, PostgreSQL `53100`).

Anything else (a constraint, a syntax error, "no such table") is not a fault here: it stays a bug
or a client error. peewee wraps the driver's exception (`peewee.OperationalError(original)`), so the
whole chain (arguments, cause and context) is searched for the driver's error.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

DATABASE_UNAVAILABLE = "database_unavailable"
STORAGE_FULL = "storage_full"

# SQLite result codes (the primary part of `sqlite_errorname`) that mean "the database is there but
# not usable right now"; a full disk is told apart.
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")
_SQLITE_FULL = "SQLITE_FULL"
# The same by message, for errors raised without an error name (e.g. by peewee's own wrapping).
_SQLITE_MESSAGES = {
    "database is locked": DATABASE_UNAVAILABLE,
    "database table is locked": DATABASE_UNAVAILABLE,
    "database schema is locked": DATABASE_UNAVAILABLE,
    "disk i/o error": DATABASE_UNAVAILABLE,
    "unable to open database file": DATABASE_UNAVAILABLE,
    "database or disk is full": STORAGE_FULL,
}
# PostgreSQL SQLSTATE classes and codes: 08 connection exception, 57 operator intervention (admin
# shutdown, crash shutdown, cannot connect now, database dropped), 53 insufficient resources (53100
# disk full, 53200 out of memory, 53300 too many connections), 25006 read-only transaction, 55000 (a
# database that does not allow connections), 55P03 lock not available, 58 system error (I/O).
_PG_FULL = {"53100"}
_PG_UNAVAILABLE_CLASSES = ("08", "57", "53", "58")
_PG_UNAVAILABLE_CODES = {"25006", "55000", "55P03"}
_PG_CONNECTION_MESSAGES = (
    "connection is closed",
    "connection already closed",
    "server closed the connection",
    "consuming input failed",
    "connection failed",
    "connection refused",
    "the connection is lost",
)

RETRY_AFTER_SECONDS = {DATABASE_UNAVAILABLE: 2, STORAGE_FULL: 30}


@dataclass(frozen=True, slots=True)
class Fault:
    """A classified outage: `code` for clients, `retry_after` seconds to wait, `reason` for the log."""

    code: str
    retry_after: int
    reason: str

    @property
    def message(self) -> str:
        """What a client is told (never the driver's message, which may name hosts or tables)."""
        if self.code == STORAGE_FULL:
            return "storage is full; the request was not stored, retry later"
        return "the database is unavailable; retry later"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the exceptions peewee wrapped in it (its first argument) and its causes, without loops."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < 16:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if current.args and isinstance(current.args[0], BaseException):
            pending.append(current.args[0])
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def _sqlite_kind(exc: sqlite3.Error) -> str | None:
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name == _SQLITE_FULL:
        return STORAGE_FULL
    if name.startswith(_SQLITE_UNAVAILABLE):
        return DATABASE_UNAVAILABLE
    return _SQLITE_MESSAGES.get(str(exc).strip().lower())


def _postgres_kind(exc: BaseException) -> str | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency; without it there is no PostgreSQL
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None) or ""
    if state in _PG_FULL:
        return STORAGE_FULL
    if state.startswith(_PG_UNAVAILABLE_CLASSES) or state in _PG_UNAVAILABLE_CODES:
        return DATABASE_UNAVAILABLE
    if not state and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return DATABASE_UNAVAILABLE  # a failed connect or a dropped connection carries no SQLSTATE
    return None


def _kind(exc: BaseException) -> str | None:
    from playhouse.pool import MaxConnectionsExceeded

    if isinstance(exc, sqlite3.Error):
        return _sqlite_kind(exc)
    if isinstance(exc, MaxConnectionsExceeded):
        return DATABASE_UNAVAILABLE
    kind = _postgres_kind(exc)
    if kind is not None:
        return kind
    import peewee

    if isinstance(exc, peewee.InterfaceError | peewee.OperationalError):
        text = str(exc).strip().lower()
        if text in _SQLITE_MESSAGES:
            return _SQLITE_MESSAGES[text]
        if any(fragment in text for fragment in _PG_CONNECTION_MESSAGES):
            return DATABASE_UNAVAILABLE
    return None


def classify(exc: BaseException) -> Fault | None:
    """The outage `exc` reports, or None when it is not one (a bug or a client error)."""
    for link in _chain(exc):
        kind = _kind(link)
        if kind is not None:
            reason = f"{type(link).__name__}: {str(link).strip().splitlines()[0] if str(link).strip() else ''}"
            return Fault(kind, RETRY_AFTER_SECONDS[kind], reason[:200])
    return None


def database_errors() -> tuple[type[BaseException], ...]:
    """Every exception type a database call may raise (for the configurator's handlers)."""
    import peewee
    from playhouse.pool import MaxConnectionsExceeded

    types: list[type[BaseException]] = [peewee.PeeweeException, sqlite3.Error, MaxConnectionsExceeded]
    try:
        import psycopg

        types.append(psycopg.Error)
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    return tuple(types)


def drop_idle_connections() -> None:
    """After an outage report, close the pool's idle connections: each may be dead (a restarted or
    terminated server is only noticed when a connection is used), and without this every one of them
    would fail one more request once the database is back. New connections are opened on demand."""
    from playhouse.pool import PooledDatabase

    from isolation import db as isolation_db

    real = isolation_db.database.obj
    if isinstance(real, PooledDatabase):
        real.close_idle()


def handle(exc: BaseException) -> Fault | None:
    """`classify(exc)`, and when the database is unavailable, drop the pool's idle connections."""
    fault = classify(exc)
    if fault is not None and fault.code == DATABASE_UNAVAILABLE:
        drop_idle_connections()
    return fault
