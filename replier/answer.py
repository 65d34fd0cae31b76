"""Answering one message: ingest it, ask the agent's provider, store the reply, hand it to the outbox.

`Answerer.process` runs for one message at a time per stream (see `replier.streams`). The ingest job
stores the inbound row and reads the context; an agent without a model is answered inside that very
job (`db_jobs.answer_offline`), any other after it by its provider, and the reply is stored by
`db_jobs.complete`. Both paths build their reply with `replier.reply.build_reply`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from isolation import NotFound
from isolation.context import IsolationContext
from isolation.faults import classify
from replier import db_jobs
from replier.connections import StreamKey
from replier.limits import is_quota_reply, quota_reply
from replier.llm import LlmError, ProviderRegistry
from replier.llm.base import LlmDefaults, chat_request
from replier.llm.breaker import BreakerOpen, Breakers
from replier.llm.guarded import LlmGuard
from replier.memory import worth_storing
from replier.protocol import Inbound
from replier.recovery import Deliveries
from replier.reply import Reply, build_reply
from replier.stage import Shared, Stage
from replier.stream_cache import StreamCache

log = logging.getLogger("replier")

FALLBACK_REPLY = "Sorry, I cannot answer right now: my language model is unavailable. Please try again in a moment."


@functools.lru_cache(maxsize=65_536)
def _context(key: StreamKey) -> IsolationContext:
    """The T+A+C+P context of a stream key (immutable, so cached)."""
    return IsolationContext(key[0], key[1], key[2], key[3])


class Answerer(Stage):
    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        settings = shared.settings
        self.cache = StreamCache(settings)
        self.defaults = LlmDefaults(
            provider=settings.llm_provider,
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
        )
        self.providers = ProviderRegistry(
            max_retries=settings.llm_max_retries,
            backoff=settings.llm_retry_backoff_seconds,
            concurrency=settings.llm_concurrency,
            tenant_concurrency=settings.llm_tenant_concurrency,
            max_providers=settings.llm_max_providers,
        )
        breakers = Breakers(settings.llm_breaker_failures, settings.llm_breaker_cooldown_seconds)
        self.guard = LlmGuard(breakers, settings.llm_deadline_seconds)  # fairness: replier/llm/guarded.py
        self.metrics.watch_breakers(breakers, settings.llm_breaker_metric_tenants)
        self._offline_logged: set[tuple[str, str]] = set()
        self.extract_memories = True  # False while draining: no second model call delays a shutdown
        self.answering: set[tuple[StreamKey, str]] = set()  # (stream, stored id) being answered now
        self.deliveries = Deliveries(shared)  # records which replies reached a connection

    async def process(
        self,
        key: StreamKey,
        sid: str | None,
        inbound: Inbound,
        started: float,
        *,
        stored_id: str | None = None,
        on_stored: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Answer `inbound` (sent by connection `sid` at `started`) to one connection of its stream.

        `stored_id`: the message is stored already (`store_early`, recovery); otherwise the ingest job
        stores it and `on_stored` runs once that job committed (the acknowledgement). The reply goes
        to the sender, or to one other connection if the sender is gone
        (`ConnectionRegistry.reply_target`), never to several.
        """
        try:
            result = await self._ingest(key, inbound, stored_id)
        except NotFound:
            await self._tell_sender(sid, inbound, "agent_unavailable", "this api key's agent no longer exists")
            return
        if on_stored is not None:
            await on_stored()
        token = (key, result.stored_id)
        self.answering.add(token)
        try:
            await self._answer(key, sid, inbound, started, result)
        finally:
            self.answering.discard(token)

    async def _answer(
        self, key: StreamKey, sid: str | None, inbound: Inbound, started: float, result: db_jobs.IngestResult
    ) -> None:
        agent = result.agent
        if not result.created and result.reply is not None:
            self.metrics.duplicates.inc()
            conn = self.connections.get(sid) if sid is not None else None
            if conn is not None:
                await self.outbox.reply(
                    [conn],
                    inbound,
                    reply_id=result.reply["message_id"],
                    text=result.reply["text"],
                    agent_name=agent.name,
                    metadata={"replayed": True, "chat_stream_id": key[3], "reply_to": inbound.message_id},
                )
                self.deliveries.delivered(key, result.reply["message_id"])
            return
        if agent.status != "active":
            await self._tell_sender(sid, inbound, "agent_disabled", "this agent is disabled")
            return
        reply = result.answer
        if reply is not None:
            self.metrics.llm_requests.labels("offline", "offline").inc()
            self._log_offline(agent)
        else:
            reply = await self._ask_provider(key, inbound, result)
            if not is_quota_reply(reply):  # a quota reply is sent, never stored (replier/limits.py)
                stored = await self.store.run(db_jobs.complete, _context(key), reply)
                if stored is not None:  # answered first elsewhere: that answer stands
                    reply = db_jobs.superseded(reply, stored)
        if reply.metadata.get("replayed"):
            self.metrics.duplicates.inc()
        if is_quota_reply(reply):
            self.cache.forget_stream(key)  # the stored context moved without the cache: read it again
        else:
            self.cache.remember(key, inbound, reply)
        sent = await self.deliver(key, sid, inbound, reply)
        if sent:
            self.metrics.reply_latency.observe(time.perf_counter() - started)

    async def deliver(self, key: StreamKey, sid: str | None, inbound: Inbound, reply: Reply) -> int:
        """Send `reply` to the one connection it goes to; how many were sent (0 or 1)."""
        conn = self.connections.reply_target(key, sid, inbound.protocol, inbound.platform)
        if conn is None:  # stays undelivered: sent when a connection of the agent comes back
            return 0
        self.connections.subscribe(conn, key)
        sent = await self.outbox.reply(
            [conn],
            inbound,
            reply_id=reply.reply_id,
            text=reply.text,
            agent_name=reply.agent_name,
            metadata=reply.metadata,
        )
        self.deliveries.delivered(key, reply.reply_id)
        return sent

    async def _tell_sender(self, sid: str | None, inbound: Inbound, code: str, message: str) -> None:
        conn = self.connections.get(sid) if sid is not None else None
        if conn is not None:
            await self.outbox.reply_error(conn, inbound, code, message)

    async def store_early(self, key: StreamKey, inbound: Inbound) -> str:
        """Only store `inbound` (its stream is busy: it is answered in its turn); the id it is stored under."""
        request = self.cache.plan(key, _context(key), inbound, self.defaults).request
        try:
            return await self.store.run(db_jobs.store_inbound, request)
        except Exception:
            if not request.stream_known:
                raise
            self.cache.forget_stream(key)  # deleted by a history cleanup? create it again
            return await self.store.run(db_jobs.store_inbound, dataclasses.replace(request, stream_known=False))

    async def _ingest(self, key: StreamKey, inbound: Inbound, stored_id: str | None = None) -> db_jobs.IngestResult:
        """Run the ingest job planned from the caches; an offline agent's answer comes back stored."""
        plan = self.cache.plan(key, _context(key), inbound, self.defaults, stored_id)
        try:
            result = await self.store.run(db_jobs.ingest, plan.request)
        except NotFound:
            raise
        except Exception as exc:
            if not plan.request.stream_known or classify(exc) is not None:
                raise  # an outage is not a deleted stream: the sender is told to retry
            # The stream may have been deleted (history cleanup): create it again, read everything.
            self.cache.forget_stream(key)
            plan.request = dataclasses.replace(
                plan.request, stream_known=False, touch=False, need_history=True, need_memories=True
            )
            result = await self.store.run(db_jobs.ingest, plan.request)
        self.cache.absorb(key, plan, result)
        return result

    def _log_offline(self, agent: db_jobs.AgentView) -> None:
        if (agent.tenant_id, agent.agent_id) not in self._offline_logged:
            self._offline_logged.add((agent.tenant_id, agent.agent_id))
            log.info("agent %s answers with the OFFLINE responder (no LLM provider configured)", agent.agent_id)

    async def _ask_provider(self, key: StreamKey, inbound: Inbound, result: db_jobs.IngestResult) -> Reply:
        """The agent's provider's reply (the fallback text if it fails), with a memory if it finds one."""
        agent = result.agent
        memories = result.memories or []
        config = self.defaults.resolve(agent.llm, agent.llm_api_key)
        provider = self.providers.get(config)
        if provider.offline:
            self._log_offline(agent)
        user_name = inbound.nickname or inbound.user_id
        if not provider.offline:  # the tenant's token budget (replier/limits.py): the model is not called
            retry_after = self.limits.over_budget(agent.tenant_id)
            if retry_after is not None:
                return quota_reply(
                    inbound, stream_id=key[3], agent_name=agent.name, user_name=user_name, provider=provider.name,
                    model=config.model, max_memories=agent.config.memory.max_memories, retry_after=retry_after,
                )  # fmt: skip
        history = result.history or []
        request = chat_request(
            config, agent.persona, agent.name, memories, history, inbound.text, user_name, prompt=not provider.offline
        )
        llm_started = time.perf_counter()
        error = None
        call = self.guard.call(provider, config, agent.tenant_id, agent.agent_id)
        try:
            llm_result = await call.complete(request)
            text, model = llm_result.text, llm_result.model
            outcome = "offline" if llm_result.offline else "ok"
            prompt_tokens, completion_tokens = llm_result.prompt_tokens, llm_result.completion_tokens
        except Exception as exc:
            error = str(exc) if isinstance(exc, LlmError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, BreakerOpen):  # an open breaker logs when it opens, not per message
                log.warning("agent %s: LLM call failed (%s); sending the fallback reply", agent.agent_id, error)
                self.metrics.llm_errors.labels(provider.name).inc()
            text, outcome, model, prompt_tokens, completion_tokens = FALLBACK_REPLY, "error", config.model, 0, 0
        latency_ms = int((time.perf_counter() - llm_started) * 1000)
        self.limits.spend(agent.tenant_id, prompt_tokens + completion_tokens)
        self.metrics.llm_requests.labels(provider.name, outcome).inc()
        memory = None
        wants_memory = agent.config.memory.enabled and agent.config.memory.max_memories > 0
        extract = provider.offline or (self.settings.llm_memory_extraction and self.extract_memories)
        if error is None and wants_memory and extract:
            try:
                memory = worth_storing(await call.extract_memory(request, text), memories)
            except Exception as exc:
                log.info("agent %s: memory extraction failed: %s", agent.agent_id, exc)
        return build_reply(
            inbound,
            stream_id=key[3],
            agent_name=agent.name,
            user_name=user_name,
            max_memories=agent.config.memory.max_memories,
            text=text,
            provider=provider.name,
            model=model,
            outcome=outcome,
            latency_ms=latency_ms,
            memory=memory,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            error=error,
            stored_id=result.stored_id,
        )
