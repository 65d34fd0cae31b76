"""Per-stream queues: messages of one chat stream are answered strictly in order, streams concurrently.

`accept` finds the message's stream (tenant, agent, platform, chat stream), subscribes the sender to
it and queues the message; the first message of an idle stream starts a task that drains its queue
through `Answerer.process`. `settle` waits until nothing is in flight (graceful drain).

Acknowledgements mean "stored": `on_stored` (set by `replier.inbound.Intake`) runs once the message's
row is committed: right after its ingest job when the stream was idle, or after a store-only job run at
once when the stream was busy (earlier messages still waiting for a slow model). Recovered messages
(`enqueue_recovered`) are stored already and have no sender to acknowledge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from isolation import Scoped
from isolation.context import IsolationContext
from replier.answer import Answerer
from replier.connections import Connection, StreamKey
from replier.faults import reply_fault
from replier.gate import KeyUsage
from replier.protocol import Inbound
from replier.stage import Shared, Stage
from replier.stream_locks import NoStreamLocks, StreamLocks, Turn

log = logging.getLogger("replier")


@functools.lru_cache(maxsize=65_536)
def stream_id(tenant_id: str, agent_id: str, platform: str, kind: str, peer: str) -> str:
    """The chat stream id of (tenant, agent, platform, group/user), as the isolation library makes it."""
    ctx = IsolationContext(tenant_id, agent_id, platform)
    return Scoped(ctx).chat_streams.stream_id_for(kind, peer)


@dataclass(slots=True)
class Item:
    """A message waiting in its stream's queue."""

    sid: str | None  # the sender's connection (None: recovered from the database)
    inbound: Inbound
    started: float
    stored: asyncio.Task | None = None  # `Answerer.store_early`, when it arrived while its stream was busy
    stored_id: str | None = None  # known up front for a recovered message
    turn: Turn = field(default_factory=Turn)  # its place in the stream's cross-replier queue (arrival time)


async def _nothing(key: StreamKey, sid: str | None, inbound: Inbound) -> None:
    return None


def _ignore(key: StreamKey, inbound: Inbound) -> None:
    return None


class Streams(Stage):
    def __init__(self, shared: Shared, usage: KeyUsage, answerer: Answerer) -> None:
        super().__init__(shared)
        self.usage = usage
        self.answerer = answerer
        self.accepting = True  # False once draining: messages are refused with "shutting_down"
        # Several repliers (REDIS_URL): one at a time answers a stream (replier/stream_locks.py).
        self.locks: StreamLocks | NoStreamLocks = NoStreamLocks()
        # Set by `Intake`: a message is stored (acknowledge it) / was not stored (forget its envelope id).
        self.on_stored: Callable[[StreamKey, str | None, Inbound], Awaitable[None]] = _nothing
        self.on_lost: Callable[[StreamKey, Inbound], None] = _ignore
        self._queues: dict[StreamKey, deque[Item]] = {}
        self._stored: set[tuple[StreamKey, str]] = set()  # queued messages already stored, by stored id
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()
        answerer.deliveries.busy = self.busy

    @property
    def inflight(self) -> int:
        """Messages accepted and not yet answered (or failed)."""
        return self._inflight

    def busy(self, key: StreamKey) -> bool:
        """Whether the stream has messages queued or being answered in this process."""
        return key in self._queues

    def in_flight(self, key: StreamKey, stored_id: str) -> bool:
        """Whether the message stored as `stored_id` in stream `key` is queued or being answered here."""
        return (key, stored_id) in self._stored or (key, stored_id) in self.answerer.answering

    async def settle(self, timeout: float) -> None:
        """Wait until no message is in flight; `TimeoutError` after `timeout` seconds."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def cancel(self) -> int:
        """Cancel the streams still answering (shutdown, after the grace); returns the messages left."""
        left = self._inflight
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return left

    async def accept(self, conn: Connection, inbound: Inbound) -> bool:
        """Queue a valid chat message from `conn` behind the earlier ones of its stream; False if refused.

        An idle stream's message is stored by its ingest job, which runs at once (no extra round
        trip); a busy stream's message is stored now by a small job of its own (`store_early`), so
        that it is acknowledged without waiting for the earlier messages' answers.
        """
        if not self.accepting:
            await self.outbox.reply_error(
                conn, inbound, "shutting_down", "server is shutting down; send again after reconnecting"
            )
            return False
        kind, peer = ("group", inbound.group_id) if inbound.group_id else ("private", inbound.user_id)
        key: StreamKey = (
            conn.tenant_id,
            conn.agent_id,
            inbound.platform,
            stream_id(conn.tenant_id, conn.agent_id, inbound.platform, kind, peer),
        )
        self.connections.subscribe(conn, key)
        self.metrics.messages_in.inc()
        self.usage.count(conn.tenant_id, conn.key_id)
        item = Item(conn.sid, inbound, time.perf_counter(), turn=Turn(inbound.received_at))
        queue = self._queues.get(key)
        if queue is not None:
            item.stored = asyncio.create_task(self._store_early(key, item))
        self._enqueue(key, item)
        return True

    def enqueue_recovered(self, key: StreamKey, inbound: Inbound, stored_id: str) -> None:
        """Queue a stored, unanswered message found by recovery (no sender: its reply goes to one
        connection of the agent on that platform, or waits for one)."""
        self._stored.add((key, stored_id))
        self._enqueue(key, Item(None, inbound, time.perf_counter(), stored_id=stored_id))

    def _enqueue(self, key: StreamKey, item: Item) -> None:
        self._inflight += 1
        self._idle.clear()
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(item)
            return
        self._queues[key] = deque((item,))
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_early(self, key: StreamKey, item: Item) -> str:
        """Store a busy stream's message now and acknowledge it; an error (never an ack) if that fails."""
        try:
            stored_id = await self.answerer.store_early(key, item.inbound)
        except Exception as exc:
            self.on_lost(key, item.inbound)
            conn = self.connections.get(item.sid) if item.sid is not None else None
            if not await reply_fault(self.outbox, conn, item.inbound, exc):
                log.exception("storing message %r failed", item.inbound.message_id)
                if conn is not None:
                    await self.outbox.reply_error(
                        conn, item.inbound, "internal_error", "the message could not be stored"
                    )
            raise
        item.stored_id = stored_id
        self._stored.add((key, stored_id))
        await self.on_stored(key, item.sid, item.inbound)
        return stored_id

    async def _drain(self, key: StreamKey) -> None:
        queue = self._queues[key]

        def following() -> Turn | None:  # this stream's next message here, when the lock is given back
            return queue[0].turn if queue else None

        try:
            while queue:
                item = queue.popleft()
                try:
                    on_wait = functools.partial(self._store_while_waiting, key, item)
                    async with self.locks.hold(key, item.turn, following, on_wait) as moved:
                        if moved:
                            self.answerer.cache.forget_context(key)
                        await self._process(key, item)
                except Exception as exc:
                    if item.stored is None and item.stored_id is None:
                        self.on_lost(key, item.inbound)
                    conn = self.connections.get(item.sid) if item.sid is not None else None
                    if await reply_fault(self.outbox, conn, item.inbound, exc):
                        continue  # an outage: the sender was told to retry (replier/faults.py)
                    log.exception("processing message %r failed", item.inbound.message_id)
                    if conn is not None:
                        await self.outbox.reply_error(
                            conn, item.inbound, "internal_error", "the message could not be processed"
                        )
                finally:
                    self._inflight -= 1
                    if item.stored_id is not None:
                        self._stored.discard((key, item.stored_id))
        finally:
            del self._queues[key]
            if self._inflight == 0:
                self._idle.set()

    def _store_while_waiting(self, key: StreamKey, item: Item) -> None:
        """Another replier holds the stream (REDIS_URL): store the message now, as a busy stream's,
        so it is acknowledged (and takes its place in the stored order) without waiting for that
        replier's answer."""
        if item.stored is None and item.stored_id is None:
            item.stored = asyncio.create_task(self._store_early(key, item))

    async def _process(self, key: StreamKey, item: Item) -> None:
        if item.stored is not None:
            try:
                stored_id = await item.stored
            except Exception:  # not stored: its sender got an error (`_store_early`), nothing to answer
                return
            await self.answerer.process(key, item.sid, item.inbound, item.started, stored_id=stored_id)
        elif item.stored_id is not None:  # recovered
            await self.answerer.process(key, None, item.inbound, item.started, stored_id=item.stored_id)
        else:
            on_stored = functools.partial(self.on_stored, key, item.sid, item.inbound)
            await self.answerer.process(key, item.sid, item.inbound, item.started, on_stored=on_stored)
