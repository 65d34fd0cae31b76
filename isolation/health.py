"""`/health` of both backends: can the database be read, can it be written, is there disk left.

A health check that only runs `SELECT 1` says "ok" while every write fails (a full disk, a SQLite file
locked by another process, a read-only PostgreSQL). The checks here are cheap and leave nothing
behind:

* `database`: `SELECT 1`;
* `write`: SQLite takes the write lock (`BEGIN IMMEDIATE`) and rolls back, so a lock held elsewhere
  shows (after a short wait of its own, `HEALTH_WRITE_TIMEOUT_MS`); PostgreSQL opens a transaction,
  asks for a transaction id (refused on a standby) and checks it is not read-only, then rolls back;
* `disk`: SQLite: free space of the database file's filesystem at least `HEALTH_MIN_FREE_MB`.
  PostgreSQL's files are on the server's filesystem, out of reach of a client: `skipped` (a full
  disk there shows as `storage_full` errors).

The checks run on a thread of their own with its own connection, never on the event loop nor on a
worker that a long batch of database work may hold, and the result is kept `HEALTH_CACHE_SECONDS`
(concurrent requests share one run); a result younger than two intervals is answered at once while
the next run refreshes it, so `/health` stays fast under load.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from peewee import SqliteDatabase

from isolation import db as isolation_db
from isolation.faults import classify

OK = "ok"
SKIPPED = "skipped"


@dataclass
class HealthReport:
    """Each check's outcome ("ok", "skipped" or "error: <why>") and the overall verdict."""

    checks: dict[str, str] = field(default_factory=dict)
    checked_at: float = 0.0

    @property
    def ok(self) -> bool:
        return all(value in (OK, SKIPPED) for value in self.checks.values())

    @property
    def status(self) -> str:
        return "ok" if self.ok else "degraded"

    def body(self) -> dict:
        return {"status": self.status, "checks": dict(self.checks)}


class _RollBack(Exception):
    """Raised inside the write check's transaction to roll it back."""


def _error(exc: BaseException) -> str:
    fault = classify(exc)
    if fault is not None:
        return f"error: {fault.code} ({type(exc).__name__})"
    return f"error: {type(exc).__name__}"


class HealthProbe:
    """The health checks of one process, on a dedicated thread, cached for `ttl` seconds."""

    @classmethod
    def from_settings(cls, settings) -> HealthProbe:
        """A probe with the `HEALTH_*` settings of `settings` (an `isolation.config.BaseServiceSettings`)."""
        return cls(
            ttl=settings.health_cache_seconds,
            min_free_bytes=settings.health_min_free_mb * 1024 * 1024,
            write_timeout_ms=settings.health_write_timeout_ms,
        )

    def __init__(
        self,
        *,
        ttl: float = 1.0,
        timeout: float = 3.0,
        min_free_bytes: int = 64 * 1024 * 1024,
        write_timeout_ms: int = 500,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.min_free_bytes = min_free_bytes
        self.write_timeout_ms = write_timeout_ms
        self._executor: ThreadPoolExecutor | None = None  # started on first use, again after `close`
        self._report: HealthReport | None = None
        self._running: asyncio.Future | None = None

    async def check(self) -> HealthReport:
        """The cached report while fresh, else a new one (one run at a time; waits at most `timeout`)."""
        report = self._report
        running = self._running
        if running is not None and running.done() and not running.cancelled() and running.exception() is None:
            report = self._report = running.result()  # a run that outlived an earlier request's wait
        age = time.monotonic() - report.checked_at if report is not None else None
        if age is not None and age < self.ttl:
            return report
        if self._running is None or self._running.done():
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
            self._running = asyncio.get_running_loop().run_in_executor(self._executor, self.run_checks)
        if age is not None and age < 2 * self.ttl:
            # Served at once while the refresh runs: a check that waits for SQLite's write lock under
            # load must not make /health slow; a failure still shows within two cache intervals.
            return report
        try:
            report = await asyncio.wait_for(asyncio.shield(self._running), self.timeout)
        except TimeoutError:
            return HealthReport({"database": f"error: no answer within {self.timeout:g}s"}, time.monotonic())
        self._report = report
        return report

    def close(self) -> None:
        """Close the thread's connection and stop the thread (a later `check` starts a new one)."""
        executor, self._executor = self._executor, None
        self._report = self._running = None
        if executor is not None:
            executor.submit(isolation_db.close_connection)
            executor.shutdown(wait=True, cancel_futures=False)

    # -- on the health thread ----------------------------------------------------------------
    def run_checks(self) -> HealthReport:
        checks: dict[str, str] = {}
        real = isolation_db.database.obj
        try:
            with isolation_db.connection():
                real.execute_sql("SELECT 1").fetchone()
                checks["database"] = OK
                checks["write"] = self._write_check(real)
        except Exception as exc:
            checks.setdefault("database", _error(exc))
            checks.setdefault("write", "error: not checked (database unreachable)")
            isolation_db.close_connection()  # a broken connection is not kept for the next run
        checks["disk"] = self._disk_check(real)
        return HealthReport(checks, time.monotonic())

    def _write_check(self, real) -> str:
        try:
            if isinstance(real, SqliteDatabase):
                # This thread's own connection: a short wait for the lock, not the writers' long one.
                real.execute_sql(f"PRAGMA busy_timeout = {int(self.write_timeout_ms)}")
                real.execute_sql("BEGIN IMMEDIATE")
                real.execute_sql("ROLLBACK")
                return OK
            try:
                with real.atomic():
                    row = real.execute_sql(
                        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), txid_current()"
                    ).fetchone()
                    raise _RollBack  # leave nothing behind: the transaction id is given back
            except _RollBack:
                pass
            if row[0]:
                return "error: read_only (server in recovery)"
            if row[1] == "on":
                return "error: read_only (transactions are read-only)"
            return OK
        except Exception as exc:
            if isinstance(real, SqliteDatabase) and real.connection().in_transaction:
                real.execute_sql("ROLLBACK")  # pragma: no cover - BEGIN IMMEDIATE succeeded, ROLLBACK failed
            return _error(exc)

    def _disk_check(self, real) -> str:
        if not isinstance(real, SqliteDatabase) or real.database == ":memory:":
            return SKIPPED
        try:
            stats = os.statvfs(os.path.dirname(os.path.abspath(real.database)))
        except OSError as exc:
            return f"error: {type(exc).__name__}"
        free = stats.f_bavail * stats.f_frsize
        if free < self.min_free_bytes:
            return f"error: storage_full ({free // 1024} KiB free, at least {self.min_free_bytes // 1024} KiB needed)"
        return OK
