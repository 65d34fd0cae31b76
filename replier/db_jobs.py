"""Database jobs of the pipeline. They run in the store's worker threads, inside a batch transaction,
and touch tenant data only through the isolation library's scoped managers."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from isolation import Scoped, fastpath, system
from isolation import db as isolation_db
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
        content_hash=content_hash(inbound), replay_window=replay_window, **_inbound_fields(inbound)
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
    agent = request.cached_agent
    reloaded = False
    agent_ctx = IsolationContext(ctx.tenant_id, ctx.agent_id)
    if agent is None or (request.check_agent and Scoped(agent_ctx).agents.version(ctx.agent_id) != agent.version):
        agent = load_agent(agent_ctx)
        reloaded = True
    _ensure_stream(request)
    session = fastpath.ChatSession(ctx)
    if request.stored_id is None and _answers_offline(request, agent):
        result = _exchange(request, session, agent, reloaded)
        if result is not None:
            return result
        # the message's id is taken (a resend, or a reused id): the general path below decides
    if request.stored_id is not None:  # stored by `store_inbound` (or found by recovery) already
        stored_id, created = request.stored_id, False
    else:
        stored_id, created = _store(session, inbound, request.replay_window)
    result = IngestResult(ctx.chat_stream_id, created, agent, reloaded, stored_id=stored_id)
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
    _read_context(request, session, agent, reloaded, result)
    if _answers_offline(request, agent):
        memories = result.memories if result.memories is not None else request.offline.memories
        result.answer = answer_offline(agent, inbound, ctx.chat_stream_id, memories, stored_id)
        stored = complete(ctx, result.answer, session=session)
        if stored is not None:
            result.answer = superseded(result.answer, stored)
    return result


def _answers_offline(request: IngestRequest, agent: AgentView) -> bool:
    """Whether the job answers the message itself: the agent, as read here, is active without a model."""
    offline = request.offline
    return (
        offline is not None
        and agent.status == "active"
        and offline.defaults.resolve(agent.llm, agent.llm_api_key).kind == "offline"
    )


def _read_context(
    request: IngestRequest, session: fastpath.ChatSession, agent: AgentView, reloaded: bool, result: IngestResult
) -> None:
    """The stream's history (without the message itself) and memories into `result`, as far as the
    caches need them (everything again when the agent changed: its limits may have)."""
    need_history = request.need_history or reloaded
    need_memories = request.need_memories or reloaded
    limit = agent.config.chat.max_context_size
    history = []
    if limit > 0 and need_history:
        for item in session.recent_messages(limit + 1):
            if item["message_id"] != result.stored_id:
                history.append((item["direction"], item["text"], item["sender_nickname"] or item["sender_user_id"]))
        history = history[-limit:]
    result.history = history if need_history else None
    if need_memories:
        memories: list[str] = []
        if agent.config.memory.enabled and agent.config.memory.max_memories > 0:
            memories = session.relevant_memories(agent.config.memory.max_memories)
        result.memories = memories


def _exchange(
    request: IngestRequest, session: fastpath.ChatSession, agent: AgentView, reloaded: bool
) -> IngestResult | None:
    """The common offline case in one statement: a new message stored under its client's id with
    its answer and usage row (`ChatSession.store_exchange`), the context read first (it never
    contained the new message). None when the id is taken: nothing was written."""
    ctx, inbound = request.ctx, request.inbound
    result = IngestResult(ctx.chat_stream_id, True, agent, reloaded, stored_id=inbound.message_id)
    _read_context(request, session, agent, reloaded, result)
    memories = result.memories if result.memories is not None else request.offline.memories
    answer = answer_offline(agent, inbound, ctx.chat_stream_id, memories, inbound.message_id)
    stored_inbound, stored_reply = session.store_exchange(
        content_hash=content_hash(inbound), inbound=_inbound_fields(inbound), reply=_reply_fields(answer),
        usage=answer.usage,
    )  # fmt: skip
    if not stored_inbound:
        return None
    if stored_reply:
        _remember(ctx, answer)
    else:  # a reply under this id was stored already (by another process): that answer stands
        answer = superseded(answer, session.message_text(answer.reply_id) or "")
    result.answer = answer
    return result


def _inbound_fields(inbound: Inbound) -> dict:
    """The `messages` row fields of an inbound message (its id as the client sent it)."""
    return {
        "message_id": inbound.message_id,
        "direction": "in",
        "text": inbound.text,
        "segments": inbound.segments,
        "sender_user_id": inbound.user_id,
        "sender_nickname": inbound.nickname,
        "reply_to": inbound.reply_to,
        # when it reached this replier: history lists a stream's messages in arrival order, whichever
        # database worker or replier commits first (`replier.stream_locks`)
        "created_at": datetime.fromtimestamp(inbound.received_at, UTC).replace(tzinfo=None),
    }


def _reply_fields(reply: Reply) -> dict:
    """The `messages` row fields of a reply."""
    return {
        "message_id": reply.reply_id,
        "direction": "out",
        "text": reply.text,
        "segments": {"type": "text", "data": reply.text},
        "sender_user_id": "maitenant-agent",
        "sender_nickname": reply.agent_name[:256],
        "reply_to": reply.reply_to,
    }


def _remember(ctx: IsolationContext, reply: Reply) -> None:
    """Store the reply's chat memory, if it found one."""
    if reply.memory:
        Scoped(ctx).memories.add(reply.memory, level="chat", source=reply.memory_source)


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
    if not session.insert_reply_with_usage(_reply_fields(reply), reply.usage):
        return session.message_text(reply.reply_id) or ""
    _remember(ctx, reply)
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


def unanswered_keys(max_age: float, grace: float, limit: int) -> list[system.UnansweredMessage]:
    """The keys of stored inbound messages with no reply, `grace` to `max_age` seconds old (recovery's
    scan, across tenants). Not a store job: it runs on the recovery thread's own connection, outside
    any transaction, so a slow scan never holds up a batch of chat messages."""
    with isolation_db.connection():
        return system.unanswered_messages(max_age, grace, limit)


def read_unanswered(rows: list[system.UnansweredMessage]) -> list[tuple[system.UnansweredMessage, dict]]:
    """Each message of `rows` with its content, read in its own tenant's context (a store job).
    Messages deleted since the scan are left out, and so are messages answered since: the scan ran
    on a connection of its own while this process may have been committing their replies (a message
    no longer in flight here has its reply committed, so this read sees it)."""
    found = []
    for row in rows:
        ctx = IsolationContext(row.tenant_id, row.agent_id, row.platform, row.chat_stream_id)
        session = fastpath.ChatSession(ctx)
        if session.message_text(REPLY_ID_PREFIX + row.message_id) is not None:
            continue
        stored = session.inbound_message(row.message_id)
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
