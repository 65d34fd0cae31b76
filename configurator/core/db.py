"""Database wiring for the configurator: start-up, shutdown, and the connection of each request.

peewee keeps connection state per thread and our routes are sync ``def`` functions that FastAPI runs
in its thread pool, so each route (and the authentication dependency) opens the connection in its own
body with `connection()` and does its work in `isolation.db.unit_of_work`. Both are the isolation
library's policy (pooled connections go back to the pool after each request, SQLite keeps one per
worker thread; the thread pool is bounded, so the number of connections is too). Never call peewee
from ``async def`` code.
"""

from __future__ import annotations

from configurator.core.config import Settings
from isolation.db import close_database, configure, connection, ping
from isolation.migrate import check_schema

__all__ = ["close_database", "connection", "init_database", "ping"]


def init_database(settings: Settings) -> int:
    """Point isolation's database at the configured URL and check the schema version.

    Raises `isolation.errors.SchemaVersionError` (with the command to run) on an unknown schema.
    """
    real = configure(settings.database_url, app_role=settings.database_app_role)
    with real.connection_context():  # closes (returns to the pool) on the way out, even on errors
        return check_schema(real)
