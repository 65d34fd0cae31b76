"""Database wiring for the configurator.

peewee keeps connection state per thread and our routes are sync ``def`` functions that FastAPI runs
in its thread pool, so each route (and the authentication dependency) opens the connection in its own
body with `connection()`. On PostgreSQL the connection is closed before the function returns, which
hands it back to the pool. On SQLite there is no pool: opening a connection costs a file open and four
PRAGMAs (more than the query itself), so each worker thread keeps its own connection open between
requests (the thread pool is bounded, so the number of connections is too). Never call peewee from
``async def`` code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peewee import Database

from configurator.core.config import Settings
from isolation import db as isolation_db
from isolation.migrate import check_schema


def init_database(settings: Settings) -> int:
    """Point isolation's database at the configured URL and check the schema version.

    Raises `isolation.errors.SchemaVersionError` (with the command to run) on an unknown schema.
    """
    real = isolation_db.configure(settings.resolved_database_url, app_role=settings.database_app_role)
    with real.connection_context():  # closes (returns to the pool) on the way out, even on errors
        return check_schema(real)


def close_database() -> None:
    real = isolation_db.database.obj
    if real is None:
        return
    if not real.is_closed():
        real.close()
    if hasattr(real, "close_all"):
        real.close_all()


def _database() -> Database:
    real = isolation_db.database.obj
    if real is None:
        raise RuntimeError("the database is not configured (create_app's lifespan configures it)")
    return real


@contextmanager
def connection() -> Iterator[None]:
    """Open this thread's connection for the enclosed work and close it afterwards.

    When the thread already has one open (nested use), it is left to the outer block.
    """
    real = _database()
    opened = real.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened and isolation_db.is_postgres() and not real.is_closed():
            real.close()


def ping() -> None:
    """A trivial query, for /health."""
    with connection():
        _database().execute_sql("SELECT 1").fetchone()
