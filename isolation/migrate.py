"""Run versioned migrations (`invoke db-upgrade`) and check the schema version at start-up.

Migrations run with the URL's own role (the schema owner). On PostgreSQL the upgrade also creates
the non-owner application role and grants it table access; row-level security binds that role.
"""

from __future__ import annotations

import logging
from types import ModuleType

from peewee import Database, PostgresqlDatabase
from psycopg import sql

from isolation.config import get_base_settings
from isolation.db import make_database, parse_database_url
from isolation.errors import SchemaVersionError
from isolation.ids import utcnow
from isolation.migrations import (
    m0001_initial,
    m0002_agent_templates,
    m0003_security,
    m0004_delivery,
    m0005_recovery,
    m0006_limits,
)

log = logging.getLogger("isolation")

MIGRATIONS: tuple[ModuleType, ...] = (
    m0001_initial,
    m0002_agent_templates,
    m0003_security,
    m0004_delivery,
    m0005_recovery,
    m0006_limits,
)
LATEST_VERSION: int = MIGRATIONS[-1].VERSION
# Functions of applied migrations that the application no longer calls: the role loses them at the
# next upgrade. `mt_tenants_with_prefix` matched tenants by their (customer-chosen) names for cleanup.
RETIRED_FUNCTION_SIGNATURES = frozenset({"mt_tenants_with_prefix(TEXT)"})
_LOCK_ID = 0x6D74_656E  # "mten": serialises concurrent upgrades on PostgreSQL

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at {ts} NOT NULL)"
)


def _dialect(db: Database) -> str:
    return "postgresql" if isinstance(db, PostgresqlDatabase) else "sqlite"


def _applied_version(db: Database) -> int:
    if not db.table_exists("schema_migrations"):
        return 0
    row = db.execute_sql("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def current_version(url: str | None = None) -> int:
    """The schema version of the database at `url` (0 for an empty database)."""
    db = make_database(url or get_base_settings().database_url, admin=True)
    try:
        return _applied_version(db)
    finally:
        db.close()


def _grant_app_role(db: Database, role: str) -> None:
    """Create the application role if needed and (re)grant what it may do. Idempotent."""
    exists = db.execute_sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    ident = sql.Identifier(role)
    cursor = db.cursor()

    def run(statement: sql.Composable) -> None:
        cursor.execute(statement)

    if not exists:
        run(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident))
    is_super = db.execute_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    if not is_super:
        # Lets a non-superuser owner `SET ROLE` to the application role.
        run(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))
    run(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
    run(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(ident))
    run(sql.SQL("REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM {}").format(ident))
    # Password hashes: every column of `accounts` but `password_hash` (revoking the table-wide SELECT
    # also revokes column grants, so a column added later is granted at the next upgrade); login reads
    # one account's hash through `mt_login_secret`.
    readable = db.execute_sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = 'accounts' AND column_name <> 'password_hash' ORDER BY ordinal_position"
    ).fetchall()
    run(sql.SQL("REVOKE SELECT ON accounts FROM {}").format(ident))
    columns = sql.SQL(", ").join(sql.Identifier(name) for (name,) in readable)
    run(sql.SQL("GRANT SELECT ({}) ON accounts TO {}").format(columns, ident))
    # Operators: the application role may not write `accounts.is_operator` (registration inserts and
    # updates every other column); only the schema owner marks operators (`invoke create-operator`).
    writable = db.execute_sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = 'accounts' AND column_name <> 'is_operator' ORDER BY ordinal_position"
    ).fetchall()
    run(sql.SQL("REVOKE INSERT, UPDATE ON accounts FROM {}").format(ident))
    columns = sql.SQL(", ").join(sql.Identifier(name) for (name,) in writable)
    run(sql.SQL("GRANT INSERT ({0}), UPDATE ({0}) ON accounts TO {1}").format(columns, ident))
    for signature in (
        *m0001_initial.FUNCTION_SIGNATURES,
        *m0003_security.LOGIN_FUNCTION_SIGNATURES,
        *m0006_limits.FUNCTION_SIGNATURES,
        *m0005_recovery.FUNCTION_SIGNATURES,
    ):
        if signature in RETIRED_FUNCTION_SIGNATURES:
            run(sql.SQL("REVOKE EXECUTE ON FUNCTION " + signature + " FROM {}").format(ident))
        else:
            run(sql.SQL("GRANT EXECUTE ON FUNCTION " + signature + " TO {}").format(ident))


def upgrade(url: str | None = None, *, app_role: str | None = None) -> list[int]:
    """Apply every pending migration in order; returns the versions applied (empty when current)."""
    settings = get_base_settings()
    url = url or settings.database_url
    role = app_role or settings.database_app_role
    db = make_database(url, admin=True)
    dialect = _dialect(db)
    applied: list[int] = []
    try:
        db.connect(reuse_if_open=True)
        if dialect == "postgresql":
            db.execute_sql("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            ts = "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
            db.execute_sql(_VERSION_TABLE.format(ts=ts))
            version = _applied_version(db)
            if version > LATEST_VERSION:
                raise SchemaVersionError(
                    f"database schema is at version {version}, newer than this code knows "
                    f"(latest {LATEST_VERSION}); upgrade MaiTenant instead of downgrading the database"
                )
            for migration in MIGRATIONS:
                if version >= migration.VERSION:
                    continue
                with db.atomic("IMMEDIATE") if dialect == "sqlite" else db.atomic():
                    migration.apply(db, dialect, role)
                    db.execute_sql(
                        f"INSERT INTO schema_migrations (version, name, applied_at) VALUES "
                        f"({db.param}, {db.param}, {db.param})",
                        (migration.VERSION, migration.NAME, utcnow()),
                    )
                applied.append(migration.VERSION)
            if dialect == "postgresql":
                with db.atomic():
                    _grant_app_role(db, role)
        finally:
            if dialect == "postgresql":
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    finally:
        db.close()
    return applied


def check_schema(db: Database) -> int:
    """Refuse to run on a schema this code does not know, and warn about a PostgreSQL without
    autovacuum (see `_warn_without_autovacuum`). Backends call this at start-up."""
    try:
        version = _applied_version(db)
    except Exception as exc:  # connection or permission problem: say what to do
        raise SchemaVersionError(f"cannot read the schema version: {exc}") from exc
    if version == LATEST_VERSION:
        _warn_without_autovacuum(db)
        return version
    if version < LATEST_VERSION:
        raise SchemaVersionError(
            f"database schema is at version {version}, this code needs {LATEST_VERSION}: "
            "run `invoke db-upgrade` (or `python -m isolation upgrade`) first"
        )
    raise SchemaVersionError(
        f"database schema is at version {version}, newer than this code knows ({LATEST_VERSION}); refusing to start"
    )


_autovacuum_warned = False


def _warn_without_autovacuum(db: Database) -> None:
    """A PostgreSQL server with autovacuum off never gathers statistics on the tables this code fills.
    Its planner then looks messages up by id through the (tenant, stream, time) index and reads the
    whole chat stream for each one: measured with perf.soak, the recovery scan took 1.7 s at 15,000
    messages (25 ms after an ANALYZE) and chat p99 grew from 30 to 760 ms in 10 minutes."""
    global _autovacuum_warned
    if _autovacuum_warned or not isinstance(db, PostgresqlDatabase):
        return  # once per process: both backends check the schema in `__main__` and again at app start-up
    if db.execute_sql("SELECT current_setting('autovacuum')").fetchone()[0] == "off":
        _autovacuum_warned = True
        log.warning(
            "PostgreSQL runs with autovacuum off: without statistics, lookups by message id read whole "
            "chat streams and slow down as history grows; turn it on or ANALYZE regularly (docs/RELIABILITY.md)"
        )


def describe(url: str) -> str:
    """A log-safe description of a database URL (no password)."""
    parsed = parse_database_url(url)
    if not parsed.is_postgres:
        return f"sqlite {parsed.path}"
    p = parsed.params or {}
    return f"postgresql {p.get('user', '')}@{p.get('host', '')}:{p.get('port', 5432)}/{p.get('dbname')}"
