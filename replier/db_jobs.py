"""Database jobs of the pipeline. They run in the store's worker threads, inside a batch transaction,
and touch tenant data only through the isolation library's scoped managers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from isolation import Scoped, fastpath
from isolation.agent_config import AgentConfig, LlmSettings, Persona
from isolation.context import IsolationContext
from isolation.crypto import SecretBoxError, decrypt_secret
from replier.protocol import REPLY_ID_PREFIX, Inbound

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
    reply: dict | None = None  # the stored reply of a replayed message
    history: list | None = None  # [(direction, text, sender)] oldest first, without this message; None = not read
    memories: list | None = None  # memory contents, oldest first; None = not read
    answer: object | None = None  # an inline answer already stored (see `ingest(answer_inline=...)`)


def _parse(model, value):
    try:
        return model.model_validate(value or {})
    except Exception:  # stored JSON that no longer validates: fall back to defaults, loudly
        log.warning("stored %s does not validate; using defaults", model.__name__)
        return model()


def load_agent(ctx: IsolationContext) -> AgentView:
    agents = Scoped(ctx).agents
    row = agents.get(ctx.agent_id)
    secret = agents.llm_secret(ctx.agent_id)
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


def ingest(
    ctx: IsolationContext,
    inbound: Inbound,
    stream_known: bool,
    cached_agent: AgentView | None,
    check_agent: bool,
    touch: bool,
    need_history: bool = True,
    need_memories: bool = True,
    answer_inline=None,
) -> IngestResult:
    """Agent (reloaded when its version moved), chat stream, the inbound row (idempotent), history
    and memories, in one go. The per-message statements use `isolation.fastpath`."""
    agent = cached_agent
    reloaded = False
    agent_ctx = IsolationContext(ctx.tenant_id, ctx.agent_id)
    if agent is None or (check_agent and Scoped(agent_ctx).agents.version(ctx.agent_id) != agent.version):
        agent = load_agent(agent_ctx)
        reloaded = True
    if ctx.chat_stream_id is None:
        raise ValueError("ingest needs the T+A+C+P context of the message's stream")
    tap_ctx = IsolationContext(ctx.tenant_id, ctx.agent_id, ctx.platform)
    streams = Scoped(tap_ctx).chat_streams
    if stream_known:
        if touch:
            streams.touch(ctx.chat_stream_id)
    else:
        stream_id = streams.get_or_create(
            group_id=inbound.group_id, user_id=inbound.user_id, group_name=inbound.group_name
        )["id"]
        if stream_id != ctx.chat_stream_id:
            raise ValueError("the stream of this message does not match its context")
    stream_id = ctx.chat_stream_id
    chat_ctx = ctx
    session = fastpath.ChatSession(chat_ctx)
    created = session.insert_message(
        message_id=inbound.message_id,
        direction="in",
        text=inbound.text,
        segments=inbound.segments,
        sender_user_id=inbound.user_id,
        sender_nickname=inbound.nickname,
        reply_to=inbound.reply_to,
    )
    result = IngestResult(stream_id, created, agent, reloaded)
    if not created:
        reply_id = REPLY_ID_PREFIX + inbound.message_id
        text = session.message_text(reply_id)
        if text is not None:
            result.reply = {"message_id": reply_id, "text": text}
            return result
        # stored before a crash but never answered: answer it now
    if agent.status != "active":
        return result
    if reloaded:  # a changed agent may have changed its limits: read everything again
        need_history = need_memories = True
    limit = agent.config.chat.max_context_size
    history = []
    if limit > 0 and need_history:
        for item in session.recent_messages(limit + 1):
            if item["message_id"] != inbound.message_id:
                history.append((item["direction"], item["text"], item["sender_nickname"] or item["sender_user_id"]))
        history = history[-limit:]
    result.history = history if need_history else None
    if need_memories:
        memories: list[str] = []
        if agent.config.memory.enabled and agent.config.memory.max_memories > 0:
            memories = session.relevant_memories(agent.config.memory.max_memories)
        result.memories = memories
    if answer_inline is not None:
        # A synchronous, deterministic responder (the offline one) answers inside this job, so the
        # whole exchange costs one database round trip and one commit.
        answer = answer_inline(agent, inbound, result.history, result.memories)
        if answer is not None:
            result.answer = answer
            complete(chat_ctx, session=session, **answer.complete_kwargs)
    return result


def complete(
    ctx: IsolationContext,
    *,
    reply_id: str,
    text: str,
    agent_name: str,
    reply_to: str,
    usage: dict,
    memory: str | None,
    memory_source: str,
    session: fastpath.ChatSession | None = None,
) -> None:
    """Store the reply, the usage row and an optional chat memory."""
    session = session if session is not None and session.ctx == ctx else fastpath.ChatSession(ctx)
    session.insert_reply_with_usage(
        {
            "message_id": reply_id,
            "direction": "out",
            "text": text,
            "segments": {"type": "text", "data": text},
            "sender_user_id": "maitenant-agent",
            "sender_nickname": agent_name[:256],
            "reply_to": reply_to,
        },
        usage,
    )
    if memory:
        Scoped(ctx).memories.add(memory, level="chat", source=memory_source)


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
