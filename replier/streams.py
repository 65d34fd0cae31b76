"""Per-stream queues: messages of one chat stream are answered strictly in order, streams concurrently.

`accept` finds the message's stream (tenant, agent, platform, chat stream), subscribes the sender to
it and queues the message; the first message of an idle stream starts a task that drains its queue
through `Answerer.process`. `settle` waits until nothing is in flight (graceful drain).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque

from isolation import Scoped
from isolation.context import IsolationContext
from replier.answer import Answerer
from replier.connections import Connection, StreamKey
from replier.faults import reply_fault
from replier.gate import KeyUsage
from replier.protocol import Inbound
from replier.stage import Shared, Stage
from replier.stream_locks import NoStreamLocks, StreamLocks

log = logging.getLogger("replier")


@functools.lru_cache(maxsize=65_536)
def stream_id(tenant_id: str, agent_id: str, platform: str, kind: str, peer: str) -> str:
    """The chat stream id of (tenant, agent, platform, group/user), as the isolation library makes it."""
    ctx = IsolationContext(tenant_id, agent_id, platform)
    return Scoped(ctx).chat_streams.stream_id_for(kind, peer)


class Streams(Stage):
    def __init__(self, shared: Shared, usage: KeyUsage, answerer: Answerer) -> None:
        super().__init__(shared)
        self.usage = usage
        self.answerer = answerer
        self.accepting = True  # False once draining: messages are refused with "shutting_down"
        # Several repliers (REDIS_URL): one at a time answers a stream (replier/stream_locks.py).
        self.locks: StreamLocks | NoStreamLocks = NoStreamLocks()
        self._queues: dict[StreamKey, deque[tuple[str, Inbound, float]]] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def inflight(self) -> int:
        """Messages accepted and not yet answered (or failed)."""
        return self._inflight

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

    async def accept(self, conn: Connection, inbound: Inbound) -> None:
        """Queue a valid chat message from `conn` behind the earlier ones of its stream."""
        if not self.accepting:
            await self.outbox.reply_error(
                conn, inbound, "shutting_down", "server is shutting down; send again after reconnecting"
            )
            return
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
        item = (conn.sid, inbound, time.perf_counter())
        queue = self._queues.get(key)
        self._inflight += 1
        self._idle.clear()
        if queue is not None:
            queue.append(item)
            return
        self._queues[key] = deque((item,))
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: StreamKey) -> None:
        queue = self._queues[key]
        try:
            while queue:
                sid, inbound, started = queue.popleft()
                try:
                    async with self.locks.hold(key) as moved:
                        if moved:
                            self.answerer.cache.forget_context(key)
                        await self.answerer.process(key, sid, inbound, started)
                except Exception as exc:
                    if await reply_fault(self.outbox, self.connections.get(sid), inbound, exc):
                        continue  # an outage: the sender was told to retry (replier/faults.py)
                    log.exception("processing message %r failed", inbound.message_id)
                    conn = self.connections.get(sid)
                    if conn is not None:
                        await self.outbox.reply_error(
                            conn, inbound, "internal_error", "the message could not be processed"
                        )
                finally:
                    self._inflight -= 1
        finally:
            del self._queues[key]
            if self._inflight == 0:
                self._idle.set()
