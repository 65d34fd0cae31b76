"""`isolation.faults` (what is an outage), `isolation.logthrottle.FaultLog` and `isolation.health`.

The errors classified here are the drivers' own exception types, raised for real where a test can
cause them (a SQLite lock held by another connection) and constructed where it cannot (a full
PostgreSQL disk): the classification reads their type, SQLSTATE and message only.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import peewee
import psycopg
import pytest
from playhouse.pool import MaxConnectionsExceeded

from isolation import logthrottle
from isolation.faults import (
    DATABASE_UNAVAILABLE,
    STORAGE_FULL,
    classify,
    database_errors,
    drop_idle_connections,
    handle,
)
from isolation.health import HealthProbe, HealthReport


def _locked_error(tmp_path) -> sqlite3.OperationalError:
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        other.execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        other.close()
        holder.close()
    raise AssertionError("the write did not meet the lock")


def test_a_locked_sqlite_is_unavailable_raw_and_wrapped_by_peewee(tmp_path):
    error = _locked_error(tmp_path)
    assert classify(error).code == DATABASE_UNAVAILABLE
    try:
        with peewee.__exception_wrapper__:
            raise error
    except peewee.OperationalError as wrapped:
        fault = classify(wrapped)
    assert fault.code == DATABASE_UNAVAILABLE and fault.retry_after == 2
    assert "database is locked" in fault.reason and "retry later" in fault.message


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (sqlite3.OperationalError("database or disk is full"), STORAGE_FULL),
        (sqlite3.OperationalError("unable to open database file"), DATABASE_UNAVAILABLE),
        (peewee.OperationalError("database or disk is full"), STORAGE_FULL),
        (peewee.InterfaceError("connection already closed"), DATABASE_UNAVAILABLE),
        (peewee.OperationalError("server closed the connection unexpectedly"), DATABASE_UNAVAILABLE),
        (psycopg.errors.DiskFull("could not extend file"), STORAGE_FULL),
        (psycopg.errors.AdminShutdown("terminating connection"), DATABASE_UNAVAILABLE),
        (psycopg.errors.TooManyConnections("sorry, too many clients"), DATABASE_UNAVAILABLE),
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), DATABASE_UNAVAILABLE),
        (psycopg.errors.ObjectNotInPrerequisiteState("not accepting connections"), DATABASE_UNAVAILABLE),
        (psycopg.OperationalError("connection failed: connection refused"), DATABASE_UNAVAILABLE),
        (MaxConnectionsExceeded("Exceeded maximum connections."), DATABASE_UNAVAILABLE),
    ],
)
def test_outages_are_classified(error, code):
    fault = classify(error)
    assert fault is not None and fault.code == code
    assert fault.retry_after == (30 if code == STORAGE_FULL else 2)


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("no such table: agents"),
        sqlite3.IntegrityError("UNIQUE constraint failed"),
        peewee.IntegrityError("duplicate key"),
        peewee.OperationalError("near SELEC: syntax error"),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.errors.SyntaxError("syntax error"),
        ValueError("not a database error"),
    ],
)
def test_bugs_and_client_errors_are_not_outages(error):
    assert classify(error) is None
    assert handle(error) is None


def test_the_cause_chain_is_searched_once_even_when_it_loops():
    inner = psycopg.errors.DiskFull("full")
    outer = RuntimeError("while storing")
    outer.__cause__ = inner
    inner.__context__ = outer  # a loop must not hang the search
    assert classify(outer).code == STORAGE_FULL
    assert classify(RuntimeError("")) is None


def test_storage_full_tells_the_client_nothing_was_stored():
    assert "not stored" in classify(sqlite3.OperationalError("database or disk is full")).message


def test_every_driver_error_type_gets_the_handler():
    types = database_errors()
    assert peewee.PeeweeException in types and psycopg.Error in types and sqlite3.Error in types


def test_an_outage_drops_the_pools_idle_connections(configured_db):
    from playhouse.pool import PooledDatabase

    from isolation import db as isolation_db

    isolation_db.ping()
    fault = handle(psycopg.errors.AdminShutdown("terminating connection"))
    assert fault.code == DATABASE_UNAVAILABLE
    if isinstance(configured_db, PooledDatabase):
        assert configured_db._connections == []  # idle ones closed; new ones open on demand
    drop_idle_connections()
    isolation_db.ping()  # and the database is usable right after


# -- FaultLog ---------------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_fault_log_writes_one_line_per_interval_with_a_count_and_the_traceback_once_per_episode(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(logthrottle.time, "monotonic", lambda: clock[0])
    logger = logging.getLogger("fault-log-test")
    handler = _Records()
    logger.addHandler(handler)
    try:
        faults = logthrottle.FaultLog(logger, 10.0)
        error = sqlite3.OperationalError("database is locked")
        fault = classify(error)
        assert faults.report(fault, "POST /agents", error) is True
        for _ in range(99):
            clock[0] += 0.05
            assert faults.report(fault, "POST /agents", error) is False
        clock[0] = 1011.0
        assert faults.report(fault, "GET /agents", error) is True
        clock[0] = 1100.0  # quiet for longer than two intervals: a new episode
        assert faults.report(fault, "POST /agents", error) is True
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in handler.records]
    assert len(lines) == 3
    assert lines[0].startswith("database_unavailable: POST /agents failed (OperationalError: database is locked)")
    assert lines[1].endswith("(99 more suppressed in the last 10 s)")
    assert [r.exc_info is not None for r in handler.records] == [True, False, True]
    assert all(r.levelno == logging.WARNING for r in handler.records)


# -- HealthProbe ------------------------------------------------------------------------------------
def test_health_checks_read_write_and_disk_and_are_cached(configured_db):
    from playhouse.pool import PooledDatabase

    probe = HealthProbe(ttl=60, min_free_bytes=1)

    async def twice():
        return await probe.check(), await probe.check()

    try:
        first, second = asyncio.run(twice())
    finally:
        probe.close()
    disk = "skipped" if isinstance(configured_db, PooledDatabase) else "ok"
    assert first.checks == {"database": "ok", "write": "ok", "disk": disk}
    assert first.ok and first.status == "ok" and first.body() == {"status": "ok", "checks": first.checks}
    assert second is first  # within the cache interval: no second run


def test_a_recent_result_is_answered_at_once_while_a_new_run_refreshes_it(configured_db):
    probe = HealthProbe(ttl=0.3, min_free_bytes=1)

    async def scenario():
        first = await probe.check()
        await asyncio.sleep(0.35)  # older than the interval, younger than two
        stale = await probe.check()
        refreshing = probe._running
        await refreshing
        return first, stale, await probe.check()

    try:
        first, stale, fresh = asyncio.run(scenario())
    finally:
        probe.close()
    assert stale is first  # answered without waiting for the run it started
    assert fresh is not first and fresh.checked_at > first.checked_at


def test_health_reports_too_little_free_disk(configured_db):
    from playhouse.pool import PooledDatabase

    if isinstance(configured_db, PooledDatabase):
        pytest.skip("the PostgreSQL server's disk is not visible to a client: the check is skipped")
    probe = HealthProbe(ttl=0, min_free_bytes=1 << 62)
    try:
        report = asyncio.run(probe.check())
    finally:
        probe.close()
    assert report.checks["disk"].startswith("error: storage_full")
    assert not report.ok and report.status == "degraded"


def test_health_that_takes_too_long_reports_it_and_the_next_check_gets_the_result(configured_db, monkeypatch):
    probe = HealthProbe(ttl=60, timeout=0.2, min_free_bytes=1)
    real_run = probe.run_checks

    def slow() -> HealthReport:
        time.sleep(0.6)
        return real_run()

    monkeypatch.setattr(probe, "run_checks", slow)

    async def scenario():
        late = await probe.check()
        await asyncio.sleep(0.6)
        return late, await probe.check()

    try:
        late, done = asyncio.run(scenario())
    finally:
        probe.close()
    assert late.checks == {"database": "error: no answer within 0.2s"} and not late.ok
    assert done.checks["database"] == "ok"  # the run that was still going, not a second one
