"""The replier, assembled: one message flows gate -> inbound -> streams -> answer -> outbox.

- `replier.gate`: who may connect (API key, capacity, shutdown), the key cache, revocation, key use;
- `replier.inbound`: parse, size check, ack and dedup of each "message" event;
- `replier.streams`: per-stream queues, so one stream's messages are answered in order;
- `replier.answer`: ingest, the agent's provider, the stored reply (with `replier.stream_cache`);
- `replier.outbox`: every send and disconnect, and the only code that touches python-socketio.

`Replier` wires them together and owns the lifecycle: the background loops (revocation checks, key
use, `gc.freeze`) and the graceful drain. Database work goes through the batching `Store`; the event
loop only parses, sends and awaits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable

from replier.answer import Answerer
from replier.connections import ConnectionRegistry
from replier.core.config import ReplierSettings
from replier.gate import Gate
from replier.inbound import Intake
from replier.llm import ProviderRegistry
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.stage import Shared
from replier.store import Store, StoreClosed
from replier.streams import Streams

log = logging.getLogger("replier")

GC_FREEZE_STEP = 50  # new connections between two `gc.freeze()` calls


class Replier:
    def __init__(self, settings: ReplierSettings, outbox: Outbox, metrics: Metrics, store: Store) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.outbox = outbox
        self.connections = ConnectionRegistry()
        shared = Shared(settings, store, metrics, self.connections, outbox)
        self.gate = Gate(shared)
        self.answerer = Answerer(shared)
        self.streams = Streams(shared, self.gate.usage, self.answerer)
        self.intake = Intake(shared, self.streams)
        self.tasks: list[asyncio.Task] = []  # the background loops, once started
        self._frozen_at = 0
        outbox.listen(connect=self.gate.on_connect, disconnect=self.gate.on_disconnect, message=self.intake.on_message)

    @property
    def providers(self) -> ProviderRegistry:
        return self.answerer.providers

    @property
    def accepting(self) -> bool:
        """False once `drain` began: new connections and messages are refused with "shutting down"."""
        return self.gate.accepting

    @property
    def frozen_at(self) -> int:
        """The connection count at the last `gc.freeze()` of the freeze loop."""
        return self._frozen_at

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(
                self._every(self.settings.revocation_check_seconds, self.gate.check_revocations, "revocation check"),
                name="replier-revocation",
            ),
            asyncio.create_task(
                self._every(self.settings.usage_flush_seconds, self.gate.usage.flush, "recording api key usage"),
                name="replier-usage",
            ),
            asyncio.create_task(self.gc_freeze_loop(), name="replier-gc"),
        ]

    async def drain(self, timeout: float) -> None:
        """Stop taking connections and messages, let in-flight replies finish, then close every connection."""
        if not self.accepting:
            return
        self.gate.accepting = self.streams.accepting = False
        if self.streams.inflight:
            log.info("waiting for %d in-flight replies", self.streams.inflight)
            try:
                await self.streams.settle(timeout)
            except TimeoutError:
                log.warning("%d replies still in flight after %.1fs; closing anyway", self.streams.inflight, timeout)
        sids = list(self.connections.by_sid)
        if sids:
            log.info("closing %d connections", len(sids))
            await self.outbox.close_all(sids)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        await self.gate.usage.flush()
        await self.providers.aclose()

    # -- background loops -------------------------------------------------------------------
    @staticmethod
    async def _every(interval: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        """Run `job` every `interval` seconds until the store closes; a failure is logged, not fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except StoreClosed:
                return
            except Exception:
                log.exception("%s failed", what)

    async def gc_freeze_loop(self) -> None:
        """`gc.freeze()` after bursts of connects keeps full collections out of the latency tail."""
        if not self.settings.gc_freeze:
            return
        while True:
            await asyncio.sleep(0.5)
            count = len(self.connections)
            if count - self._frozen_at >= GC_FREEZE_STEP:
                # Move the new connections' long-lived objects out of the collector's way (cheap).
                gc.freeze()
                self._frozen_at = count
            elif count < self._frozen_at:
                self._frozen_at = count
