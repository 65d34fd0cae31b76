"""The replier, assembled: one message flows gate -> inbound -> streams -> answer -> outbox.

- `replier.gate`: who may connect (API key, capacity, shutdown), the key cache, revocation, key use;
- `replier.inbound`: parse, size check, ack and dedup of each "message" event;
- `replier.streams`: per-stream queues, so one stream's messages are answered in order;
- `replier.answer`: ingest, the agent's provider, the stored reply (with `replier.stream_cache`);
- `replier.outbox`: every send and disconnect, and the only code that touches python-socketio;
- `replier.recovery`: stored messages with no reply (answered at start and every
  `recovery_interval_seconds`), delivery state, and undelivered replies sent to connections that come back.

`Replier` wires them together and owns the lifecycle: the background loops (revocation checks, key
use, `gc.freeze`) and the graceful drain. Database work goes through the batching `Store`; the event
loop only parses, sends and awaits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable

from isolation.signals import Signal
from replier.answer import Answerer
from replier.connection_counts import ALIVE_REFRESH_SECONDS
from replier.connections import ConnectionRegistry
from replier.core.config import ReplierSettings
from replier.faults import report
from replier.gate import Gate
from replier.inbound import Intake
from replier.limits import TenantLimiter
from replier.llm import ProviderRegistry
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.recovery import Recovery
from replier.signals import SignalListener
from replier.stage import Shared
from replier.store import Store, StoreClosed
from replier.stream_locks import StreamLocks
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
        self.limits = TenantLimiter(settings, store, metrics, self.connections, outbox)
        shared = Shared(settings, store, metrics, self.connections, outbox, self.limits)
        self.gate = Gate(shared)
        self.answerer = Answerer(shared)
        self.streams = Streams(shared, self.gate.usage, self.answerer)
        self.intake = Intake(shared, self.streams)
        self.recovery = Recovery(shared, self.streams)
        self.deliveries = self.answerer.deliveries
        self.tasks: list[asyncio.Task] = []  # the background loops, once started
        self._hurry = asyncio.Event()
        self._connect_tasks: set[asyncio.Task] = set()
        self._frozen_at = 0
        self._frozen_peak = 0  # the connection count of the freezes since the last unfreeze
        self.signals: SignalListener | None = None
        if settings.redis_url:
            self.signals = SignalListener(
                settings.redis_url, settings.redis_prefix, self.on_signal, self.gate.check_revocations
            )
            self.streams.locks = StreamLocks(
                settings.redis_url, settings.redis_prefix, settings.instance_name, settings.answer_budget_seconds
            )
        outbox.listen(connect=self.on_connect, disconnect=self.gate.on_disconnect, message=self.intake.on_message)

    async def on_connect(self, sid: str, environ: dict, auth: object = None) -> None:
        """The gate decides; an accepted connection then gets its agent's undelivered replies (in a
        task: they follow the connect acknowledgement)."""
        await self.gate.on_connect(sid, environ, auth)
        conn = self.connections.get(sid)
        if conn is not None:
            task = asyncio.create_task(self._deliver_stored(conn))
            self._connect_tasks.add(task)
            task.add_done_callback(self._connect_tasks.discard)

    async def _deliver_stored(self, conn) -> None:
        try:
            await self.deliveries.on_connect(conn)
        except StoreClosed:
            return
        except Exception:
            log.exception("delivering stored replies to connection %s failed", conn.connection_id)

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
            asyncio.create_task(
                self._every(self.settings.limits_refresh_seconds, self.limits.refresh, "refreshing tenant limits"),
                name="replier-limits",
            ),
            asyncio.create_task(self.recovery_loop(), name="replier-recovery"),
        ]
        if self.signals is not None:
            self.tasks.append(asyncio.create_task(self.signals.run(), name="replier-signals"))
        if self.limits.shared_connections is not None:
            self.tasks.append(
                asyncio.create_task(
                    self._every(ALIVE_REFRESH_SECONDS, self.limits.heartbeat, "connection counts heartbeat"),
                    name="replier-connection-counts",
                )
            )

    async def on_signal(self, signal: Signal) -> int:
        """A key, agent or tenant changed (another process said so): act on it now, for that tenant only.

        Returns how many connections were closed. The database decides, as in the periodic check:
        the signal only says whose state to re-read.
        """
        self.gate.forget_cached(signal.tenant_id, key_id=signal.key_id, agent_id=signal.agent_id)
        if signal.kind != "key":
            self.answerer.cache.forget_agent(signal.tenant_id, signal.agent_id)
        closed = 0
        if signal.kind == "tenant":  # limits, suspension, resumption or deletion by the operator or owner
            closed = await self.limits.reload(signal.tenant_id)
        return closed + await self.gate.check_revocations(signal.tenant_id)

    def hurry(self) -> None:
        """A second stop signal: the drain waits at most `SHUTDOWN_FORCE_SECONDS` more (the store
        stop, the usage flush and the rest of the shutdown still run)."""
        self._hurry.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking connections and messages, let in-flight replies finish, then close every connection.

        In-flight replies are sent before any connection is closed; the wait ends after `timeout`
        seconds, or `SHUTDOWN_FORCE_SECONDS` after `hurry()`. No new memory extraction starts once
        draining (a second model call would only make the wait longer).
        """
        if not self.accepting:
            return
        self.gate.accepting = self.streams.accepting = False
        self.answerer.extract_memories = False
        if self.streams.inflight:
            log.info("waiting up to %.1fs for %d in-flight replies", timeout, self.streams.inflight)
            started = asyncio.get_running_loop().time()
            if not await self._settle(timeout):
                waited = asyncio.get_running_loop().time() - started  # shorter than `timeout` after a second signal
                log.warning("%d replies still in flight after %.1fs; closing anyway", self.streams.inflight, waited)
        sids = list(self.connections.by_sid)
        if sids:
            log.info("closing %d connections", len(sids))
            await self.outbox.close_all(sids)

    async def _settle(self, timeout: float) -> bool:
        """Wait until nothing is in flight (True), at most `timeout` or the shorter wait after `hurry`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settled = asyncio.ensure_future(self.streams.settle(timeout))
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({settled, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not settled.done() and hurried.done():
                left = min(deadline - loop.time(), self.settings.shutdown_force_seconds)
                log.warning("second stop signal: waiting at most %.1fs more for in-flight replies", max(0.0, left))
                await asyncio.wait({settled}, timeout=max(0.0, left))
        finally:
            hurried.cancel()
            if not settled.done():
                settled.cancel()
        return settled.done() and not settled.cancelled() and settled.exception() is None

    async def stop(self) -> None:
        """After the drain: end the background loops and what is still in flight, flush key use, and
        only then close the LLM clients (a reply still using one would fail with "client has been closed")."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        await asyncio.to_thread(self.recovery.close)
        abandoned = await self.streams.cancel()
        if abandoned:
            log.warning("%d replies abandoned at shutdown (stored messages are answered after the restart)", abandoned)
        for task in list(self._connect_tasks):
            task.cancel()
        await asyncio.gather(*self._connect_tasks, return_exceptions=True)
        await self.deliveries.flush()
        await self.gate.usage.flush()
        await self.providers.aclose()
        await self.streams.locks.aclose()
        await self.limits.aclose()

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
            except Exception as exc:
                if report(exc, what) is None:  # an outage is logged once per interval (replier/faults.py)
                    log.exception("%s failed", what)

    async def recovery_loop(self) -> None:
        """A recovery pass at start, a second one as soon as the messages the first found too young
        (stored within `recovery_grace_seconds` before a crash) are old enough, then every
        `recovery_interval_seconds` (stalled work). Without the second pass, what a kill -9 left
        just before the restart waited a whole interval (54 s measured with perf/crash_run.py)."""
        settings = self.settings
        pause = min(settings.recovery_grace_seconds + 0.5, settings.recovery_interval_seconds)
        while self.accepting:
            try:
                await self.recovery.run_once()
            except StoreClosed:
                return
            except Exception as exc:
                if report(exc, "recovery pass") is None:  # an outage: one line per interval, no traceback each
                    log.exception("recovery pass failed")
            await asyncio.sleep(pause)
            pause = settings.recovery_interval_seconds

    async def gc_freeze_loop(self) -> None:
        """`gc.freeze()` after bursts of connects keeps full collections out of the latency tail.

        Frozen objects are never collected, including garbage frozen with them (a connection that
        closed while its cycles still waited for a collection). When the connection count falls to
        half of what it was at the last freeze, most of what was frozen belongs to connections that are
        gone: `gc.unfreeze()` hands it back to the collector, and the next burst is frozen afresh.
        """
        if not self.settings.gc_freeze:
            return
        while True:
            await asyncio.sleep(0.5)
            count = len(self.connections)
            if count - self._frozen_at >= GC_FREEZE_STEP:
                # Move the new connections' long-lived objects out of the collector's way (cheap).
                gc.freeze()
                self._frozen_at = count
                self._frozen_peak = max(self._frozen_peak, count)
            elif count < self._frozen_at:
                self._frozen_at = count
                if self._frozen_peak and count <= self._frozen_peak // 2:
                    gc.unfreeze()
                    self._frozen_peak = count
