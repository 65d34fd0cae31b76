"""The replier's work: authenticate connections, validate messages, answer them stream by stream.

Messages of one chat stream are processed strictly in order (one task drains a stream's queue);
different streams run concurrently. Database work goes through the batching `Store`; the event loop
only parses, sends and awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import orjson
import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from isolation import NotFound, Scoped
from isolation.context import IsolationContext
from isolation.ids import hash_api_key, utcnow
from isolation.system import lookup_api_key
from replier import db_jobs
from replier.connections import Connection, ConnectionRegistry, StreamKey, new_connection_id
from replier.core.config import ReplierSettings
from replier.llm import LlmError, LlmRequest, ProviderRegistry, build_prompt, resolve_provider_config
from replier.llm.offline import rule_memory
from replier.memory import worth_storing
from replier.metrics import Metrics
from replier.protocol import (
    API,
    LEGACY,
    REPLY_ID_PREFIX,
    BadInput,
    Inbound,
    build_ack,
    build_api_error,
    build_api_reply,
    build_legacy_error,
    build_legacy_reply,
    parse_api_message,
    parse_envelope,
    parse_legacy_message,
)
from replier.store import Store, StoreClosed
from replier.transport import encoded_size

log = logging.getLogger("replier")

FALLBACK_REPLY = "Sorry, I cannot answer right now: my language model is unavailable. Please try again in a moment."
_NEGATIVE_CACHE_SECONDS = 0.5
_MAX_KNOWN_STREAMS = 200_000
_MAX_CACHED_STREAMS = 50_000
_MAX_DEDUP = 500_000
_MAX_KEY_CACHE = 100_000
_TOUCH_SECONDS = 30.0


@functools.lru_cache(maxsize=65_536)
def _stream_id(tenant_id: str, agent_id: str, platform: str, kind: str, peer: str) -> str:
    """The chat stream id of (tenant, agent, platform, group/user), as the isolation library makes it."""
    ctx = IsolationContext(tenant_id, agent_id, platform)
    return Scoped(ctx).chat_streams.stream_id_for(kind, peer)


@functools.lru_cache(maxsize=65_536)
def _contexts(key: StreamKey) -> IsolationContext:
    """The T+A+C+P context of a stream key (immutable, so cached)."""
    return IsolationContext(key[0], key[1], key[2], key[3])


@dataclass(slots=True)
class InlineAnswer:
    """An answer made and stored inside the ingest job (offline responder)."""

    reply_id: str
    text: str
    memory: str | None
    user_name: str | None
    max_memories: int
    metadata: dict
    complete_kwargs: dict


class Replier:
    def __init__(self, settings: ReplierSettings, sio: socketio.AsyncServer, metrics: Metrics, store: Store) -> None:
        self.settings = settings
        self.sio = sio
        self.metrics = metrics
        self.store = store
        self.connections = ConnectionRegistry()
        self.providers = ProviderRegistry(
            max_retries=settings.llm_max_retries,
            backoff=settings.llm_retry_backoff_seconds,
            concurrency=settings.llm_concurrency,
        )
        self._key_cache: dict[str, tuple[float, Any]] = {}
        self._agents: dict[tuple[str, str], tuple[db_jobs.AgentView, float]] = {}
        self._known_streams: OrderedDict[StreamKey, float] = OrderedDict()
        self._dedup: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._queues: dict[StreamKey, deque] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._key_uses: Counter = Counter()
        self._tasks: list[asyncio.Task] = []
        self._stream_tasks: set[asyncio.Task] = set()
        self._frozen_at = 0
        self._offline_logged: set[tuple[str, str]] = set()
        # Per-stream history and memories, refreshed from the database at least every
        # `context_cache_seconds` (and whenever the agent changes); safe to lose.
        self._history: dict[StreamKey, tuple[deque, float]] = {}
        self._memories: dict[StreamKey, tuple[list, float]] = {}
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)
        sio.on("message", self.on_message)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._revocation_loop(), name="replier-revocation"),
            asyncio.create_task(self._usage_loop(), name="replier-usage"),
            asyncio.create_task(self._gc_loop(), name="replier-gc"),
        ]

    async def drain(self, timeout: float) -> None:
        """Stop taking messages, let in-flight replies finish, then close every connection."""
        if not self._accepting:
            return
        self._accepting = False
        if self._inflight:
            log.info("waiting for %d in-flight replies", self._inflight)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("%d replies still in flight after %.1fs; closing anyway", self._inflight, timeout)
        sids = list(self.connections.by_sid)
        if sids:
            log.info("closing %d connections", len(sids))
            await asyncio.gather(*(self.sio.disconnect(sid) for sid in sids), return_exceptions=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._flush_usage()
        await self.providers.aclose()

    # -- connect / disconnect ---------------------------------------------------------------
    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        if not self._accepting:
            self._refuse("shutting_down", "server is shutting down")
        if len(self.connections) >= self.settings.max_connections:
            self._refuse("server_full", f"server full: at most {self.settings.max_connections} connections")
        api_key = environ.get("HTTP_X_APIKEY")
        if api_key:
            protocol, platform = API, environ.get("HTTP_X_PLATFORM")
        else:
            api_key = environ.get("HTTP_AUTHORIZATION") or ""
            if api_key[:7].lower() == "bearer ":
                api_key = api_key[7:]
            protocol, platform = LEGACY, environ.get("HTTP_PLATFORM")
        api_key = api_key.strip()
        if not api_key:
            self._refuse("missing_key", "missing api key: send it in the x-apikey (or Authorization) header")
        principal = await self._lookup(api_key)
        if principal is None:
            self._refuse("invalid_key", "invalid api key")
        reason = principal.refusal()
        if reason:
            self._refuse(reason.replace(" ", "_"), reason)
        if len(self.connections) >= self.settings.max_connections:
            self._refuse("server_full", f"server full: at most {self.settings.max_connections} connections")
        conn = Connection(
            sid=sid,
            connection_id=new_connection_id(),
            protocol=protocol,
            key_id=principal.key_id,
            tenant_id=principal.tenant_id,
            agent_id=principal.agent_id,
            platform=(platform or "")[:64] or None,
            api_key=api_key,
        )
        self.connections.add(conn)
        self.metrics.connects.labels(protocol).inc()
        self.metrics.connections.labels(protocol).inc()
        log.debug("connection %s accepted (%s, key %s)", conn.connection_id, protocol, principal.key_id)

    def _refuse(self, code: str, reason: str) -> None:
        self.metrics.refused.labels(code).inc()
        raise socketio.exceptions.ConnectionRefusedError(reason)

    async def _lookup(self, secret: str):
        digest = hash_api_key(secret)
        now = time.monotonic()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await self.store.run(lookup_api_key, secret)
        ttl = self.settings.key_cache_seconds if principal is not None else _NEGATIVE_CACHE_SECONDS
        if len(self._key_cache) > _MAX_KEY_CACHE:
            self._key_cache.clear()
        self._key_cache[digest] = (now + ttl, principal)
        return principal

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self.connections.remove(sid)
        if conn is not None:
            self.metrics.connections.labels(conn.protocol).dec()

    # -- messages ---------------------------------------------------------------------------
    async def on_message(self, sid: str, data: Any = None) -> None:
        conn = self.connections.get(sid)
        if conn is None:
            return
        if conn.protocol == API:
            await self._on_api_message(conn, data)
        else:
            await self._on_legacy_message(conn, data)

    async def _on_api_message(self, conn: Connection, data: Any) -> None:
        try:
            envelope = parse_envelope(data)
        except BadInput as exc:
            await self._api_error(conn, exc)
            return
        if envelope.type == "sys_ack":
            return  # never ack an ack
        if envelope.msg_id:
            await self._emit(build_ack(envelope.msg_id, conn.connection_id), conn.sid)
            if self._seen(conn, envelope.msg_id):
                self.metrics.duplicates.inc()
                return
        try:
            if envelope.type != "sys_std":
                if envelope.type.startswith("custom_"):
                    raise BadInput(
                        "unsupported_type", f"custom message type {envelope.type[:60]!r} is not handled here"
                    )
                raise BadInput("invalid_envelope", f"unknown envelope type {envelope.type[:60]!r}")
            self._check_size(data)
            inbound = parse_api_message(envelope, data, self.settings.max_text_bytes)
        except BadInput as exc:
            await self._api_error(conn, exc, msg_id=envelope.msg_id, payload=data)
            return
        await self._accept(conn, inbound)

    async def _on_legacy_message(self, conn: Connection, data: Any) -> None:
        try:
            self._check_size(data)
            inbound = parse_legacy_message(data, self.settings.max_text_bytes)
        except BadInput as exc:
            self.metrics.rejected.labels(exc.code).inc()
            platform = conn.platform
            message_id = None
            if isinstance(data, dict) and isinstance(data.get("message_info"), dict):
                info = data["message_info"]
                message_id = str(info.get("message_id"))[:100] if info.get("message_id") is not None else None
            await self.sio.emit(
                "message", build_legacy_error(exc.code, str(exc), platform=platform, message_id=message_id), to=conn.sid
            )
            return
        await self._accept(conn, inbound)

    def _check_size(self, data: Any) -> None:
        try:
            size = encoded_size(data)
        except orjson.JSONEncodeError:  # the only cause for decoded JSON: nesting beyond orjson's 254 levels
            raise BadInput("invalid_payload", "message nests too deeply") from None
        if size > self.settings.max_payload_bytes:
            raise BadInput("payload_too_large", f"message is larger than {self.settings.max_payload_bytes} bytes")

    async def _api_error(self, conn: Connection, exc: BadInput, msg_id: str | None = None, payload: Any = None) -> None:
        self.metrics.rejected.labels(exc.code).inc()
        message_id = None
        with contextlib.suppress(KeyError, TypeError):
            message_id = str(payload["payload"]["message_info"]["message_id"])[:100]
        await self.sio.emit(
            "message", build_api_error(exc.code, str(exc), msg_id=msg_id, message_id=message_id), to=conn.sid
        )

    def _seen(self, conn: Connection, msg_id: str) -> bool:
        """Whether this connection's tenant+agent already sent `msg_id` (remembered for a while)."""
        key = (conn.tenant_id, conn.agent_id, msg_id)
        now = time.monotonic()
        dedup = self._dedup
        while dedup:
            _, expiry = next(iter(dedup.items()))
            if expiry > now and len(dedup) < _MAX_DEDUP:
                break
            dedup.popitem(last=False)
        if key in dedup:
            return True
        dedup[key] = now + self.settings.dedup_ttl_seconds
        return False

    async def _accept(self, conn: Connection, inbound: Inbound) -> None:
        if not self._accepting:
            await self._send_error(
                conn, inbound, "shutting_down", "server is shutting down; send again after reconnecting"
            )
            return
        kind, peer = ("group", inbound.group_id) if inbound.group_id else ("private", inbound.user_id)
        stream_id = _stream_id(conn.tenant_id, conn.agent_id, inbound.platform, kind, peer)
        key: StreamKey = (conn.tenant_id, conn.agent_id, inbound.platform, stream_id)
        self.connections.subscribe(conn, key)
        self.metrics.messages_in.inc()
        self._key_uses[(conn.tenant_id, conn.key_id)] += 1
        item = (conn.sid, inbound, time.perf_counter())
        queue = self._queues.get(key)
        self._inflight += 1
        self._idle.clear()
        if queue is not None:
            queue.append(item)
            return
        self._queues[key] = deque((item,))
        task = asyncio.create_task(self._drain_stream(key))
        self._stream_tasks.add(task)
        task.add_done_callback(self._stream_tasks.discard)

    async def _drain_stream(self, key: StreamKey) -> None:
        queue = self._queues[key]
        try:
            while queue:
                sid, inbound, started = queue.popleft()
                try:
                    await self._process(key, sid, inbound, started)
                except Exception:
                    log.exception("processing message %r failed", inbound.message_id)
                    conn = self.connections.get(sid)
                    if conn is not None:
                        await self._send_error(conn, inbound, "internal_error", "the message could not be processed")
                finally:
                    self._inflight -= 1
        finally:
            del self._queues[key]
            if self._inflight == 0:
                self._idle.set()

    async def _emit(self, data: dict, sid: str) -> None:
        """Send one "message" event to one connection.

        `AsyncServer.emit` creates a task per recipient and waits on it; for a single local recipient
        we encode the Socket.IO packet once and hand it to Engine.IO directly.
        """
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        if eio_sid is None:
            return
        pkt = self.sio.packet_class(sio_packet.EVENT, namespace="/", data=["message", data])
        await self.sio.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, pkt.encode()))

    async def _send_error(self, conn: Connection, inbound: Inbound, code: str, message: str) -> None:
        self.metrics.rejected.labels(code).inc()
        if conn.protocol == API:
            data = build_api_error(code, message, msg_id=inbound.msg_id, message_id=inbound.message_id)
        else:
            data = build_legacy_error(code, message, platform=inbound.platform, message_id=inbound.message_id)
        await self._emit(data, conn.sid)

    async def _ingest(self, key: StreamKey, inbound: Inbound) -> db_jobs.IngestResult:
        """Run the ingest job; with an offline agent the answer is made and stored in the same job."""
        tenant_id, agent_id, _, _ = key
        ctx = _contexts(key)
        now = time.monotonic()
        cached = self._agents.get((tenant_id, agent_id))
        check = cached is None or now - cached[1] >= self.settings.agent_cache_seconds
        last_touch = self._known_streams.get(key)
        known = last_touch is not None
        touch = known and now - last_touch >= _TOUCH_SECONDS
        agent = cached[0] if cached else None
        ttl = self.settings.context_cache_seconds
        history = self._history.get(key)
        memories = self._memories.get(key)
        need_history = history is None or now - history[1] >= ttl
        need_memories = memories is None or now - memories[1] >= ttl
        inline = None
        if agent is not None and self._is_offline(agent):
            memories_hint = list(memories[0]) if memories is not None else []

            def inline(agent_now, inbound_now, history_now, memories_now):  # runs in a database thread
                if agent_now.status != "active" or not self._is_offline(agent_now):
                    return None
                return self._offline_answer(
                    key, agent_now, inbound_now, memories_now if memories_now is not None else memories_hint
                )

        try:
            result = await self.store.run(
                db_jobs.ingest, ctx, inbound, known, agent, check, touch, need_history, need_memories, inline
            )
        except NotFound:
            raise
        except Exception:
            if not known:
                raise
            # The stream may have been deleted (history cleanup): create it again, read everything.
            self._known_streams.pop(key, None)
            result = await self.store.run(db_jobs.ingest, ctx, inbound, False, agent, check, False, True, True, inline)
            known = False
        if check or result.agent_reloaded:
            self._agents[(tenant_id, agent_id)] = (result.agent, now)
        limit = result.agent.config.chat.max_context_size
        if len(self._history) > _MAX_CACHED_STREAMS or len(self._memories) > _MAX_CACHED_STREAMS:
            self._history.clear()
            self._memories.clear()
        if result.history is not None:
            self._history[key] = (deque(result.history, maxlen=max(limit, 1)), now)
        elif history is not None:
            result.history = list(history[0])[-limit:] if limit else []
        if result.memories is not None:
            self._memories[key] = (list(result.memories), now)
        elif memories is not None:
            result.memories = list(memories[0])
        if not known or touch:
            self._known_streams[key] = now
            self._known_streams.move_to_end(key)
            if len(self._known_streams) > _MAX_KNOWN_STREAMS:
                self._known_streams.popitem(last=False)
        return result

    async def _process(self, key: StreamKey, sid: str, inbound: Inbound, started: float) -> None:
        tenant_id, agent_id, _, stream_id = key
        try:
            result = await self._ingest(key, inbound)
        except NotFound:
            conn = self.connections.get(sid)
            if conn is not None:
                await self._send_error(conn, inbound, "agent_unavailable", "this api key's agent no longer exists")
            return
        agent = result.agent
        if not result.created and result.reply is not None:
            self.metrics.duplicates.inc()
            conn = self.connections.get(sid)
            if conn is not None:
                metadata = {"replayed": True, "chat_stream_id": stream_id, "reply_to": inbound.message_id}
                await self._deliver(
                    [conn], inbound, result.reply["message_id"], result.reply["text"], agent.name, metadata
                )
            return
        if agent.status != "active":
            conn = self.connections.get(sid)
            if conn is not None:
                await self._send_error(conn, inbound, "agent_disabled", "this agent is disabled")
            return
        if result.answer is not None:
            answer = result.answer
            self.metrics.llm_requests.labels("offline", "offline").inc()
            if (tenant_id, agent_id) not in self._offline_logged:
                self._offline_logged.add((tenant_id, agent_id))
                log.info("agent %s answers with the OFFLINE responder (no LLM provider configured)", agent_id)
            self._remember(key, inbound, answer.user_name, answer.text, agent.name, answer.memory, answer.max_memories)
            sent = await self._deliver(
                self.connections.targets(key), inbound, answer.reply_id, answer.text, agent.name, answer.metadata
            )
            if sent:
                self.metrics.reply_latency.observe(time.perf_counter() - started)
            return
        config = self._provider_config(agent)
        provider = self.providers.get(config)
        if provider.offline and (tenant_id, agent_id) not in self._offline_logged:
            self._offline_logged.add((tenant_id, agent_id))
            log.info("agent %s answers with the OFFLINE responder (no LLM provider configured)", agent_id)
        user_name = inbound.nickname or inbound.user_id
        # The offline responder reads the structured fields; only a real model needs the prompt.
        prompt = (
            []
            if provider.offline
            else build_prompt(
                persona=agent.persona,
                agent_name=agent.name,
                memories=result.memories or [],
                history=result.history or [],
                user_text=inbound.text,
                user_name=user_name,
            )
        )
        request = LlmRequest(
            messages=prompt,
            model=config.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout=config.timeout,
            persona=agent.persona,
            agent_name=agent.name,
            memories=result.memories or [],
            user_text=inbound.text,
            user_name=user_name,
        )
        llm_started = time.perf_counter()
        error = None
        try:
            llm_result = await provider.complete(request)
            text = llm_result.text
            outcome = "offline" if llm_result.offline else "ok"
            model = llm_result.model
            prompt_tokens, completion_tokens = llm_result.prompt_tokens, llm_result.completion_tokens
        except Exception as exc:
            error = str(exc) if isinstance(exc, LlmError) else f"{type(exc).__name__}: {exc}"
            log.warning("agent %s: LLM call failed (%s); sending the fallback reply", agent_id, error)
            self.metrics.llm_errors.labels(provider.name).inc()
            text, outcome, model, prompt_tokens, completion_tokens = FALLBACK_REPLY, "error", config.model, 0, 0
        latency_ms = int((time.perf_counter() - llm_started) * 1000)
        self.metrics.llm_requests.labels(provider.name, outcome).inc()
        memory = None
        wants_memory = agent.config.memory.enabled and agent.config.memory.max_memories > 0
        if error is None and wants_memory and (provider.offline or self.settings.llm_memory_extraction):
            try:
                memory = worth_storing(await provider.extract_memory(request, text), result.memories or [])
            except Exception as exc:
                log.info("agent %s: memory extraction failed: %s", agent_id, exc)
        reply_id = REPLY_ID_PREFIX + inbound.message_id
        chat_ctx = _contexts(key)
        await self.store.run(
            db_jobs.complete,
            chat_ctx,
            reply_id=reply_id,
            text=text,
            agent_name=agent.name,
            reply_to=inbound.message_id,
            usage={
                "provider": provider.name,
                "model": (model or "unknown")[:128],
                "outcome": outcome,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "latency_ms": latency_ms,
                "error": error,
            },
            memory=memory,
            memory_source="offline-rule" if provider.offline else "llm",
        )
        self._remember(key, inbound, user_name, text, agent.name, memory, agent.config.memory.max_memories)
        metadata = {
            "provider": provider.name,
            "model": model,
            "offline": provider.offline,
            "outcome": outcome,
            "chat_stream_id": stream_id,
            "reply_to": inbound.message_id,
        }
        if error is not None:
            metadata["error"] = "llm_unavailable"
        sent = await self._deliver(self.connections.targets(key), inbound, reply_id, text, agent.name, metadata)
        if sent:
            self.metrics.reply_latency.observe(time.perf_counter() - started)

    def _is_offline(self, agent: db_jobs.AgentView) -> bool:
        return self._provider_config(agent).kind == "offline"

    def _provider_config(self, agent: db_jobs.AgentView):
        return resolve_provider_config(
            agent.llm,
            agent.llm_api_key,
            default_provider=self.settings.llm_provider,
            default_base_url=self.settings.llm_base_url,
            default_model=self.settings.llm_model,
            default_api_key=self.settings.llm_api_key,
        )

    def _offline_answer(
        self, key: StreamKey, agent: db_jobs.AgentView, inbound: Inbound, memories: list[str]
    ) -> InlineAnswer:
        """The offline responder's reply and memory for one message (pure; runs in a database thread)."""
        started = time.perf_counter()
        user_name = inbound.nickname or inbound.user_id
        request = LlmRequest(
            messages=[],
            persona=agent.persona,
            agent_name=agent.name,
            memories=memories,
            user_text=inbound.text,
            user_name=user_name,
        )
        provider = self.providers.offline
        text = provider.respond(request)
        memory = None
        if agent.config.memory.enabled and agent.config.memory.max_memories > 0:
            memory = worth_storing(rule_memory(inbound.text, user_name), memories)
        reply_id = REPLY_ID_PREFIX + inbound.message_id
        metadata = {
            "provider": provider.name,
            "model": "offline",
            "offline": True,
            "outcome": "offline",
            "chat_stream_id": key[3],
            "reply_to": inbound.message_id,
        }
        complete_kwargs = {
            "reply_id": reply_id,
            "text": text,
            "agent_name": agent.name,
            "reply_to": inbound.message_id,
            "usage": {
                "provider": provider.name,
                "model": "offline",
                "outcome": "offline",
                "latency_ms": int((time.perf_counter() - started) * 1000),
            },
            "memory": memory,
            "memory_source": "offline-rule",
        }
        return InlineAnswer(
            reply_id, text, memory, user_name, agent.config.memory.max_memories, metadata, complete_kwargs
        )

    def _remember(
        self, key: StreamKey, inbound: Inbound, user_name, reply: str, agent_name: str, memory, max_memories: int
    ) -> None:
        """Add the stored exchange to the cached history (and memory) of the stream."""
        cached = self._history.get(key)
        if cached is not None:
            cached[0].append(("in", inbound.text, user_name))
            cached[0].append(("out", reply, agent_name))
        if memory:
            memories = self._memories.get(key)
            if memories is not None:
                memories[0].append(memory)
                del memories[0][:-max_memories]

    async def _deliver(
        self, conns: list[Connection], inbound: Inbound, reply_id: str, text: str, agent_name: str, metadata: dict
    ) -> int:
        sent = 0
        for conn in conns:
            if conn.protocol == API:
                data = build_api_reply(
                    inbound,
                    reply_id=reply_id,
                    text=text,
                    api_key=conn.api_key,
                    agent_name=agent_name,
                    metadata=metadata,
                )
            else:
                data = build_legacy_reply(
                    inbound, reply_id=reply_id, text=text, agent_name=agent_name, metadata=metadata
                )
            await self._emit(data, conn.sid)
            sent += 1
        if sent:
            self.metrics.messages_out.inc(sent)
        return sent

    # -- background loops -------------------------------------------------------------------
    async def _revocation_loop(self) -> None:
        interval = self.settings.revocation_check_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_revocations()
            except StoreClosed:
                return
            except Exception:
                log.exception("revocation check failed")

    async def check_revocations(self) -> int:
        """Close connections whose key was revoked, deleted or has expired; returns how many."""
        by_tenant = self.connections.keys_by_tenant()
        if not by_tenant:
            return 0
        statuses = await self.store.run(db_jobs.key_statuses, by_tenant)
        now = utcnow()
        closed = 0
        for (tenant_id, key_id), row in statuses.items():
            if row is not None and row["status"] == "active" and (row["expires_at"] is None or row["expires_at"] > now):
                continue
            for digest, (_, principal) in list(self._key_cache.items()):
                if principal is not None and principal.key_id == key_id and principal.tenant_id == tenant_id:
                    del self._key_cache[digest]
            for conn in self.connections.with_key(tenant_id, key_id):
                log.info("closing connection %s: its api key is no longer valid", conn.connection_id)
                if conn.protocol == API:
                    await self.sio.emit(
                        "message", build_api_error("key_revoked", "api key revoked or expired; closing"), to=conn.sid
                    )
                await self.sio.disconnect(conn.sid)
                self.metrics.revoked_closed.inc()
                closed += 1
        return closed

    async def _usage_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.usage_flush_seconds)
            try:
                await self._flush_usage()
            except StoreClosed:
                return
            except Exception:
                log.exception("recording api key usage failed")

    async def _flush_usage(self) -> None:
        if not self._key_uses:
            return
        counts, self._key_uses = dict(self._key_uses), Counter()
        await self.store.run(db_jobs.record_key_use, counts)

    async def _gc_loop(self) -> None:
        """`gc.freeze()` after bursts of connects keeps full collections out of the latency tail."""
        if not self.settings.gc_freeze:
            return
        while True:
            await asyncio.sleep(0.5)
            count = len(self.connections)
            if count - self._frozen_at >= 50:
                # Move the new connections' long-lived objects out of the collector's way (cheap).
                gc.freeze()
                self._frozen_at = count
            elif count < self._frozen_at:
                self._frozen_at = count
