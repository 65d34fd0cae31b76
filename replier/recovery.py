"""Unfinished work after a crash, a disconnect or a failure: stored messages with no reply, and replies
never handed to a connection.

Delivery guarantees (docs/RELIABILITY.md states them for operators):

- `Deliveries` records `messages.delivered_at` of every reply handed to a connection. The updates of
  `MARK_DELAY_SECONDS` go to the database as one job (one indexed statement per reply, sent as one
  batch), which the store batches with the other jobs: the hot path pays no round trip of its own,
  and under load the marks cost a few jobs a second instead of one per event-loop turn (on
  PostgreSQL each extra batch is an extra commit). A crash (kill -9) between a send and that job's
  commit leaves the reply undelivered in the database: it is
  delivered once more when a connection of its agent comes back (at most one redelivery, marked
  `replayed` and `redelivered` in its metadata), never lost.
- When a connection authenticates, the agent's replies (on the connection's platform) younger than
  `recovery_max_age_seconds` with no `delivered_at` are sent to it and it joins their streams; a
  stream being answered in this process right now is skipped (its reply is on its way).
- `Recovery` looks, at start and every `recovery_interval_seconds`, for inbound messages stored
  between `recovery_grace_seconds` and `recovery_max_age_seconds` ago with no reply (a crash after the
  ack, or a failure after the store), skips those in flight in this process, and queues each in its
  stream (`Streams.enqueue_recovered`), in its tenant's context, in order. The database decides
  whether a reply is stored (`db_jobs.complete`), so a message another process answers at the same
  moment is still answered once. Each message is tried at most `MAX_ATTEMPTS` times per process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

from isolation import db as isolation_db
from isolation.context import IsolationContext
from replier import db_jobs
from replier.connections import Connection, StreamKey
from replier.protocol import Inbound
from replier.stage import Shared, Stage
from replier.store import StoreClosed

log = logging.getLogger("replier")

SCAN_LIMIT = 500  # unanswered messages per recovery pass
UNDELIVERED_LIMIT = 500  # replies sent to one connection when it connects
MAX_ATTEMPTS = 3  # recovery tries per message and process
MAX_REMEMBERED = 100_000
MARK_DELAY_SECONDS = 0.2  # deliveries recorded together; a crash inside it means one redelivery


def _never(key: StreamKey) -> bool:
    return False


class Deliveries(Stage):
    """Which replies were handed to a connection; the ones that were not, for connections coming back."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.busy: Callable[[StreamKey], bool] = _never  # set by `Streams`: a stream answered here now
        self._pending: dict[str, list[tuple[str, str, str, str]]] = {}  # tenant -> replies to mark
        self._unflushed: set[tuple[str, str, str]] = set()  # (tenant, stream, reply id) sent, not yet marked
        self._scheduled = False
        self._jobs: set[asyncio.Future] = set()

    def delivered(self, key: StreamKey, reply_id: str) -> None:
        """`reply_id` of stream `key` was handed to a connection: mark it (coalesced, see the module)."""
        tenant_id, agent_id, platform, stream = key
        self._pending.setdefault(tenant_id, []).append((agent_id, platform, stream, reply_id))
        self._unflushed.add((tenant_id, stream, reply_id))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(MARK_DELAY_SECONDS, self._submit)

    def _submit(self) -> asyncio.Future | None:
        self._scheduled = False
        batch, self._pending = self._pending, {}
        if not batch:
            return None
        try:
            job = self.store.run(db_jobs.mark_delivered, batch)
        except StoreClosed:
            log.warning("store closed: %d delivered replies not recorded", sum(map(len, batch.values())))
            return None
        self._jobs.add(job)
        job.add_done_callback(lambda done: self._marked(done, batch))
        return job

    def _marked(self, job: asyncio.Future, batch: dict[str, list[tuple[str, str, str, str]]]) -> None:
        self._jobs.discard(job)
        for tenant_id, replies in batch.items():
            for _agent, _platform, stream, reply_id in replies:
                self._unflushed.discard((tenant_id, stream, reply_id))
        if not job.cancelled() and job.exception() is not None:
            # Left undelivered in the database: delivered again when a connection comes back.
            log.warning("recording %d delivered replies failed: %s", sum(map(len, batch.values())), job.exception())

    async def flush(self) -> None:
        """Record every pending delivery now and wait for it (at shutdown)."""
        self._submit()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)

    async def on_connect(self, conn: Connection) -> int:
        """Send `conn` its agent's undelivered replies (its platform's); how many were sent."""
        if self.settings.recovery_max_age_seconds <= 0:
            return 0
        ctx = IsolationContext(conn.tenant_id, conn.agent_id)
        rows = await self.store.run(
            db_jobs.undelivered, ctx, conn.platform, self.settings.recovery_max_age_seconds, UNDELIVERED_LIMIT
        )
        sent = 0
        for row in rows:
            key: StreamKey = (conn.tenant_id, conn.agent_id, row["platform"], row["chat_stream_id"])
            if (conn.tenant_id, key[3], row["message_id"]) in self._unflushed or self.busy(key):
                continue  # on its way (or just sent) from this process
            if self.connections.get(conn.sid) is not conn:
                break  # gone meanwhile: the rest waits for the next connection
            self._unflushed.add((conn.tenant_id, key[3], row["message_id"]))  # no second connection sends it
            self.connections.subscribe(conn, key)
            inbound = Inbound(
                protocol=conn.protocol,
                msg_id=None,
                message_id=row["reply_to"] or "",
                platform=row["platform"],
                time=0.0,
                text="",
                segments={},
                user_id=row["user_id"] or row["stream_user_id"],
                nickname=row["nickname"],
                group_id=row["group_id"],
                group_name=row["group_name"],
            )
            metadata = {
                "replayed": True,
                "redelivered": True,
                "chat_stream_id": key[3],
                "reply_to": row["reply_to"],
            }
            await self.outbox.reply(
                [conn],
                inbound,
                reply_id=row["message_id"],
                text=row["text"],
                agent_name=row["agent_name"] or "",
                metadata=metadata,
            )
            self.delivered(key, row["message_id"])
            sent += 1
        if sent:
            log.info("delivered %d stored replies to connection %s on connect", sent, conn.connection_id)
        return sent


class Recovery(Stage):
    """Answers stored messages that have no reply (see the module docstring)."""

    def __init__(self, shared: Shared, streams) -> None:
        super().__init__(shared)
        self.streams = streams
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._scanner: ThreadPoolExecutor | None = None  # the scan's thread (and so its connection)

    def close(self) -> None:
        """Close the scan thread's connection and stop the thread (at shutdown, after the loop ended)."""
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            scanner.submit(isolation_db.close_connection)
            scanner.shutdown(wait=True, cancel_futures=False)

    async def run_once(self) -> int:
        """One recovery pass; how many messages it queued.

        The scan runs on a thread and connection of its own, never as a store job: a job shares its
        batch's transaction with chat messages, so a slow scan held up every message of its batch
        (the soak on a PostgreSQL without statistics: a 1.7 s scan, chat p99 from 30 ms to 760 ms).
        Only the rare messages it finds are read back through the store, in their tenants' contexts.
        """
        settings = self.settings
        if settings.recovery_max_age_seconds <= 0:
            return 0
        if self._scanner is None:
            self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replier-recovery")
        keys = await asyncio.get_running_loop().run_in_executor(
            self._scanner,
            db_jobs.unanswered_keys,
            settings.recovery_max_age_seconds,
            settings.recovery_grace_seconds,
            SCAN_LIMIT,
        )
        if len(self._attempts) > MAX_REMEMBERED:
            self._attempts.clear()
        due = []
        for row in keys:
            key: StreamKey = (row.tenant_id, row.agent_id, row.platform, row.chat_stream_id)
            if self.streams.in_flight(key, row.message_id):
                continue
            seen = (row.tenant_id, row.chat_stream_id, row.message_id)
            attempts = self._attempts.get(seen, 0)
            if attempts >= MAX_ATTEMPTS:
                continue
            self._attempts[seen] = attempts + 1
            due.append(row)
        if not due:
            return 0
        queued = 0
        for row, stored in await self.store.run(db_jobs.read_unanswered, due):
            key = (row.tenant_id, row.agent_id, row.platform, row.chat_stream_id)
            if self.streams.in_flight(key, row.message_id):  # became so while its content was read
                continue
            inbound = Inbound(
                protocol="",
                msg_id=None,
                message_id=row.message_id,
                platform=row.platform,
                time=stored["created_at"].replace(tzinfo=UTC).timestamp(),
                text=stored["text"],
                segments=stored["segments"],
                user_id=stored["sender_user_id"] or stored["user_id"],
                nickname=stored["sender_nickname"],
                group_id=stored["group_id"],
                group_name=stored["group_name"],
                reply_to=stored["reply_to"],
            )
            self.streams.enqueue_recovered(key, inbound, row.message_id)
            queued += 1
        if queued:
            log.info("recovery: answering %d stored messages that have no reply", queued)
        return queued
