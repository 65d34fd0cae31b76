"""Database jobs of the pipeline. They run in the store's worker threads, inside a batch transaction,
and touch tenant data only through the isolation library's scoped managers."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

import orjson

from isolation import Scoped, fastpath, system
from isolation.agent_config import AgentConfig, LlmSettings, Persona
from isolation.context import IsolationContext
from isolation.crypto import SecretBoxError, decrypt_secret
from isolation.ids import utcnow
from replier.llm.base import LlmDefaults, LlmRequest
from replier.llm.offline import offline_answer
from replier.memory import worth_storing
from replier.protocol import REPLY_ID_PREFIX, Inbound
from replier.reply import Reply, build_reply

log = logging.getLogger("replier.db")


@dataclass(frozen=True, slots=True)
class AgentView:
    tenant_id: str
    agent_id: str
    name: str
    version: int
    status: str
    persona: Persona
    config: AgentConfig
    llm: LlmSettings
    llm_api_key: str | None


@dataclass(slots=True)
class IngestResult:
    chat_stream_id: str
    created: bool
    agent: AgentView
    agent_reloaded: bool
    stored_id: str = ""  # the id the inbound message is stored under (`ChatSession.store_inbound`)
    reply: dict | None = None  # the stored reply of a replayed message
    history: list | None = None  # [(direction, text, sender)] oldest first, without this message; None = not read
    memories: list | None = None  # memory contents, oldest first; None = not read
    answer: Reply | None = None  # the offline answer made and stored in the job (see `IngestRequest.offline`)


@dataclass(frozen=True, slots=True)
class AnswerOffline:
    """Answer inside the ingest job when the agent, as read there, is active and has no model.

    The offline responder is synchronous and deterministic, so the whole exchange then costs one
    database round trip and one commit. `memories` are the stream's cached memories, used when the
    job does not read them again.
    """

    defaults: LlmDefaults
    memories: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IngestRequest:
    """What `ingest` does for one message. `ctx` is the message's T+A+C+P context; the flags say what
    the event loop's caches already hold (the agent, the stream, its history and memories)."""

    ctx: IsolationContext
    inbound: Inbound
    stream_known: bool = False
    cached_agent: AgentView | None = None
    check_agent: bool = True
    touch: bool = False
    need_history: bool = True
    need_memories: bool = True
    offline: AnswerOffline | None = None
    replay_window: float = 3600.0  # seconds within which an identical resend is a replay
    stored_id: str | None = None  # already stored under this id: only answer it


def _parse(model, value):
    try:
        return model.model_validate(value or {})
    except Exception:  # stored JSON that no longer validates: fall back to defaults, loudly
        log.warning("stored %s does not validate; using defaults", model.__name__)
        return model()


def load_agent(ctx: IsolationContext) -> AgentView:
    agents = Scoped(ctx).agents
    row = agents.get(ctx.agent_id)
    secret = agents.encrypted_api_key(ctx.agent_id)
    api_key = None
    if secret:
        try:
            api_key = decrypt_secret(secret)
        except SecretBoxError:
            log.warning("agent %s: stored LLM key cannot be decrypted; ignoring it", ctx.agent_id)
    return AgentView(
        tenant_id=ctx.tenant_id,
        agent_id=ctx.agent_id,
        name=row["name"],
        version=row["version"],
        status=row["status"],
        persona=_parse(Persona, row.get("persona")),
        config=_parse(AgentConfig, row.get("config")),
        llm=_parse(LlmSettings, row.get("llm")),
        llm_api_key=api_key,
    )


def content_hash(inbound: Inbound) -> str:
    """SHA-256 of what makes two sends of a message id the same message: its sender and segments."""
    canonical = orjson.dumps([inbound.user_id, inbound.segments], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _store(session: fastpath.ChatSession, inbound: Inbound, replay_window: float) -> tuple[str, bool]:
    """Store `inbound` unless it is a replay (`ChatSession.store_inbound`); (stored id, created)."""
    return session.store_inbound(
        content_hash=content_hash(inbound),
        replay_window=replay_window,
        message_id=inbound.message_id,
        direction="in",
        text=inbound.text,
        segments=inbound.segments,
        sender_user_id=inbound.user_id,
        sender_nickname=inbound.nickname,
        reply_to=inbound.reply_to,
    )


def _ensure_stream(request: IngestRequest) -> None:
    """Create the message's chat stream unless the caches know it (touch it now and then)."""
    ctx, inbound = request.ctx, request.inbound
    if ctx.chat_stream_id is None:
        raise ValueError("ingest needs the T+A+C+P context of the message's stream")
    streams = Scoped(IsolationContext(ctx.tenant_id, ctx.agent_id, ctx.platform)).chat_streams
    if request.stream_known:
        if request.touch:
            streams.touch(ctx.chat_stream_id)
        return
    stream_id = streams.get_or_create(
        group_id=inbound.group_id, user_id=inbound.user_id, group_name=inbound.group_name
    )["id"]
    if stream_id != ctx.chat_stream_id:
        raise ValueError("the stream of this message does not match its context")


def store_inbound(request: IngestRequest) -> str:
    """Only store the message (its stream first); the id it is stored under.

    Used while the message's stream is busy: the message is acknowledged once this commits, and
    answered in its turn by `ingest` (with `stored_id` set).
    """
    _ensure_stream(request)
    return _store(fastpath.ChatSession(request.ctx), request.inbound, request.replay_window)[0]


def ingest(request: IngestRequest) -> IngestResult:
    """Agent (reloaded when its version moved), chat stream, the inbound row (idempotent), history
    and memories, in one go. The per-message statements use `isolation.fastpath`."""
    ctx, inbound = request.ctx, request.inbound
    need_history, need_memories = request.need_history, request.need_memories
    agent = request.cached_agent
    reloaded = False
    agent_ctx = IsolationContext(ctx.tenant_id, ctx.agent_id)
    if agent is None or (request.check_agent and Scoped(agent_ctx).agents.version(ctx.agent_id) != agent.version):
        agent = load_agent(agent_ctx)
        reloaded = True
    _ensure_stream(request)
    stream_id = ctx.chat_stream_id
    chat_ctx = ctx
    session = fastpath.ChatSession(chat_ctx)
    if request.stored_id is not None:  # stored by `store_inbound` (or found by recovery) already
        stored_id, created = request.stored_id, False
    else:
        stored_id, created = _store(session, inbound, request.replay_window)
    result = IngestResult(stream_id, created, agent, reloaded, stored_id=stored_id)
    if not created:
        reply_id = REPLY_ID_PREFIX + stored_id
        text = session.message_text(reply_id)
        if text is not None:
            result.reply = {"message_id": reply_id, "text": text}
            return result
        # stored earlier (before a crash, or by `store_inbound` while the stream was busy) and not
        # answered yet: answer it now
    if agent.status != "active":
        return result
    if reloaded:  # a changed agent may have changed its limits: read everything again
        need_history = need_memories = True
    limit = agent.config.chat.max_context_size
    history = []
    if limit > 0 and need_history:
        for item in session.recent_messages(limit + 1):
            if item["message_id"] != stored_id:
                history.append((item["direction"], item["text"], item["sender_nickname"] or item["sender_user_id"]))
        history = history[-limit:]
    result.history = history if need_history else None
    if need_memories:
        memories: list[str] = []
        if agent.config.memory.enabled and agent.config.memory.max_memories > 0:
            memories = session.relevant_memories(agent.config.memory.max_memories)
        result.memories = memories
    offline = request.offline
    if offline is not None and offline.defaults.resolve(agent.llm, agent.llm_api_key).kind == "offline":
        memories = result.memories if result.memories is not None else offline.memories
        result.answer = answer_offline(agent, inbound, stream_id, memories, stored_id)
        stored = complete(chat_ctx, result.answer, session=session)
        if stored is not None:
            result.answer = superseded(result.answer, stored)
    return result


def answer_offline(
    agent: AgentView, inbound: Inbound, stream_id: str, memories: list[str], stored_id: str | None = None
) -> Reply:
    """The offline responder's reply to one message (pure: no database, no event loop)."""
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
    wants_memory = agent.config.memory.enabled and agent.config.memory.max_memories > 0
    answer = offline_answer(request, keep_memory=wants_memory)
    return build_reply(
        inbound,
        stream_id=stream_id,
        agent_name=agent.name,
        user_name=user_name,
        max_memories=agent.config.memory.max_memories,
        text=answer.text,
        provider="offline",
        model="offline",
        outcome="offline",
        latency_ms=int((time.perf_counter() - started) * 1000),
        memory=worth_storing(answer.memory, memories),
        stored_id=stored_id,
    )


def complete(ctx: IsolationContext, reply: Reply, session: fastpath.ChatSession | None = None) -> str | None:
    """Store the reply, its usage row and an optional chat memory; None when stored.

    When the message already has a stored reply (another process or a recovery pass answered it
    first), nothing is written and the stored reply's text is returned: that answer stands, so a
    message is never answered twice, whichever process finishes first.
    """
    session = session if session is not None and session.ctx == ctx else fastpath.ChatSession(ctx)
    inserted = session.insert_reply_with_usage(
        {
            "message_id": reply.reply_id,
            "direction": "out",
            "text": reply.text,
            "segments": {"type": "text", "data": reply.text},
            "sender_user_id": "maitenant-agent",
            "sender_nickname": reply.agent_name[:256],
            "reply_to": reply.reply_to,
        },
        reply.usage,
    )
    if not inserted:
        return session.message_text(reply.reply_id) or ""
    if reply.memory:
        Scoped(ctx).memories.add(reply.memory, level="chat", source=reply.memory_source)
    return None


def superseded(reply: Reply, stored_text: str) -> Reply:
    """`reply` replaced by the answer stored first (it is the one sent, marked as a replay)."""
    metadata = {**reply.metadata, "replayed": True}
    return dataclasses.replace(reply, text=stored_text, memory=None, metadata=metadata)


def key_statuses(by_tenant: dict[str, set[str]]) -> dict[tuple[str, str], dict | None]:
    """Current status of open connections' keys; a missing key (deleted) maps to None."""
    result: dict[tuple[str, str], dict | None] = {}
    for tenant_id, key_ids in by_tenant.items():
        rows = Scoped(IsolationContext(tenant_id)).api_keys.statuses(sorted(key_ids))
        for key_id in key_ids:
            result[(tenant_id, key_id)] = rows.get(key_id)
    return result


def record_key_use(counts: dict[tuple[str, str], int]) -> None:
    for (tenant_id, key_id), uses in counts.items():
        Scoped(IsolationContext(tenant_id)).api_keys.record_use(key_id, uses)


def find_unanswered(max_age: float, grace: float, limit: int) -> list[tuple[system.UnansweredMessage, dict]]:
    """Stored inbound messages with no reply, `grace` to `max_age` seconds old, each with its content
    read in its own tenant's context (recovery). Messages deleted in between are left out."""
    found = []
    for row in system.unanswered_messages(max_age, grace, limit):
        ctx = IsolationContext(row.tenant_id, row.agent_id, row.platform, row.chat_stream_id)
        stored = fastpath.ChatSession(ctx).inbound_message(row.message_id)
        if stored is not None:
            found.append((row, stored))
    return found


def mark_delivered(by_tenant: dict[str, list[tuple[str, str, str, str]]]) -> None:
    """Record the replies handed to connections, per tenant (one statement per hundred replies)."""
    when = utcnow()
    for tenant_id, replies in by_tenant.items():
        fastpath.mark_delivered(IsolationContext(tenant_id), replies, when)


def undelivered(ctx: IsolationContext, platform: str | None, max_age: float, limit: int) -> list[dict]:
    """The agent's replies younger than `max_age` seconds that no connection got (see `fastpath`)."""
    return fastpath.undelivered_replies(ctx, platform, utcnow() - timedelta(seconds=max_age), limit)
