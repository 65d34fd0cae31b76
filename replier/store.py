"""Database work off the event loop: a few worker threads, each running queued jobs in batches.

A job is a plain function that uses the isolation library's scoped managers. A worker takes every job
waiting in the queue (up to `batch_max`), runs them in **one** write transaction, commits once and
hands all results back to the event loop with a single `call_soon_threadsafe`. When a job raises, the
batch is rolled back and re-run with one savepoint per job, so only the failing job fails. One commit
per batch instead of per message is what makes this faster than a thread hop per query: under load
many messages share one commit. On SQLite a separate thread checkpoints the WAL, so writers never wait
for fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from isolation import db as isolation_db
from isolation.faults import handle
from isolation.logthrottle import FaultLog

log = logging.getLogger("replier.store")

_faults = FaultLog(log, 10.0)
_STOP = object()
_SAFETY_CHECKPOINT_PAGES = 20_000  # ~80 MB of WAL before a writer checkpoints by itself


class StoreClosed(RuntimeError):
    """The store no longer accepts work (shutting down)."""


class Store:
    def __init__(
        self, workers: int = 1, batch_max: int = 256, checkpoint_seconds: float = 0.5, synchronous_commit: bool = True
    ) -> None:
        self.workers = max(1, workers)
        # False: PostgreSQL commits the batches without waiting for the WAL flush (CHAT_SYNCHRONOUS_COMMIT).
        self.synchronous_commit = synchronous_commit
        self.batch_max = max(1, batch_max)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._stopping = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self.checkpoint_seconds = checkpoint_seconds
        self.batches = 0
        self.jobs = 0
        self.busy_seconds = 0.0
        self.cpu_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        if not isolation_db.is_postgres() and self.checkpoint_seconds > 0:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="replier-db-checkpoint", daemon=True
            )
            self._checkpointer.start()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"replier-db-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _checkpoint_loop(self) -> None:
        """SQLite: checkpoint the WAL from this thread, so writers never wait for its fsyncs.

        The workers' own automatic checkpoint is pushed far out (a safety net only); a PASSIVE
        checkpoint here copies committed pages to the database file without blocking writers.
        """
        while not self._stopping.wait(self.checkpoint_seconds):
            try:
                isolation_db.database.obj.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception:  # pragma: no cover - a PASSIVE checkpoint does not fail; the loop must outlive it
                log.debug("WAL checkpoint failed", exc_info=True)
        try:
            isolation_db.close_connection()
        except Exception:  # pragma: no cover - closing an idle SQLite connection at exit must not raise
            log.debug("closing the checkpoint connection failed", exc_info=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then stop the workers (blocking; call from a thread or at exit)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self._checkpointer is not None:
            self._checkpointer.join(max(0.0, deadline - time.monotonic()))
            self._checkpointer = None

    # -- submitting -----------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        """Queue `fn(*args, **kwargs)`; the returned future resolves on the event loop after the commit."""
        if self._closed:
            raise StoreClosed("store is closed")
        future = self._loop.create_future()
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        self._queue.put((fn, args, future))
        return future

    # -- worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        q = self._queue
        if self._checkpointer is not None:
            try:  # see _checkpoint_loop: the checkpoint thread does this work
                isolation_db.database.obj.execute_sql(f"PRAGMA wal_autocheckpoint = {_SAFETY_CHECKPOINT_PAGES}")
            except Exception:  # pragma: no cover - a PRAGMA on a fresh connection; a tuning, never fatal
                log.debug("cannot move the automatic checkpoint", exc_info=True)
        while True:
            item = q.get()
            if item is _STOP:
                break
            batch = [item]
            stop_after = False
            while len(batch) < self.batch_max:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop_after = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop_after:
                break
        try:
            isolation_db.close_connection()
        except Exception:  # pragma: no cover - closing a pooled connection at exit must not raise
            log.debug("closing the worker's connection failed", exc_info=True)

    def _run_batch(self, batch: list) -> None:
        started = time.perf_counter()
        cpu_started = time.thread_time()
        try:
            results = self._run_optimistic(batch)
        except Exception:
            # One job failed: roll the whole batch back and run every job in its own savepoint,
            # so the failing one rolls back alone and the others still commit.
            self._reset_if_broken()
            results = self._run_isolated(batch)
        self.batches += 1
        self.jobs += len(batch)
        self.busy_seconds += time.perf_counter() - started
        self.cpu_seconds += time.thread_time() - cpu_started
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
                loop.call_soon_threadsafe(_resolve, results)

    def _begin_batch(self) -> None:
        if not self.synchronous_commit:
            isolation_db.commit_without_flush()

    def _run_optimistic(self, batch: list) -> list:
        """Every job in one transaction, no savepoints (the common case: nothing fails)."""
        results = []
        with isolation_db.unit_of_work(write=True):  # each job binds its own tenant
            self._begin_batch()
            for fn, args, future in batch:
                results.append((future, True, fn(*args)))
        return results

    def _run_isolated(self, batch: list) -> list:
        results: list[tuple[asyncio.Future, bool, Any]] = []
        try:
            with isolation_db.unit_of_work(write=True):
                self._begin_batch()
                for fn, args, future in batch:
                    try:
                        with isolation_db.unit_of_work(write=True):  # nested: a savepoint per job
                            value = fn(*args)
                        results.append((future, True, value))
                    except Exception as exc:
                        results.append((future, False, exc))
        except Exception as exc:  # the commit itself failed: every job of the batch failed
            fault = handle(exc)
            if fault is None:
                log.exception("database batch of %d jobs failed", len(batch))
            else:  # an outage: one line per interval, the jobs' callers answer "retry later"
                _faults.report(fault, f"database batch of {len(batch)} jobs", exc)
            results = [(future, False, exc) for _, _, future in batch]
            self._reset_connection()
        return results

    def _reset_if_broken(self) -> None:
        database = isolation_db.database.obj
        if database is not None and database.in_transaction():  # pragma: no cover - atomic() rolled back
            self._reset_connection()

    @staticmethod
    def _reset_connection() -> None:
        try:
            isolation_db.close_connection()
        except Exception:  # pragma: no cover - closing an already broken connection must not raise
            log.debug("resetting a broken connection failed", exc_info=True)


def _resolve(results: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
