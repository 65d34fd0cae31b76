"""Precompiled, scoped statements for the replier's per-message hot path.

Building a peewee query costs far more than running it; at thousands of chat messages per second
that dominates. These functions run fixed SQL strings (built once per dialect) and keep the same
guarantees as the scoped managers: every statement filters by the whole context (tenant, agent,
platform, chat stream), inserts take those columns from the context only, and on PostgreSQL the
tenant is bound to the transaction first (row-level security). They need a T+A+C+P context and must
run inside a transaction (`write_transaction`).
"""

from __future__ import annotations

import json
from functools import lru_cache

from isolation import db as _db
from isolation.context import IsolationContext, Level
from isolation.ids import new_id, utcnow

_MESSAGE_COLUMNS = (
    "tenant_id, id, agent_id, platform, chat_stream_id, message_id, direction, "
    "sender_user_id, sender_nickname, text, segments, reply_to, created_at"
)
_STREAM_FILTER = "tenant_id = {p} AND agent_id = {p} AND platform = {p} AND chat_stream_id = {p}"


@lru_cache(maxsize=2)
def _sql(param: str) -> dict[str, str]:
    p = param
    stream = _STREAM_FILTER.format(p=p)
    return {
        "insert_message": (
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({', '.join([p] * 13)}) "
            "ON CONFLICT (tenant_id, chat_stream_id, message_id) DO NOTHING"
        ),
        "message_text": f"SELECT text FROM messages WHERE {stream} AND message_id = {p}",
        "recent": (
            "SELECT message_id, direction, text, sender_user_id, sender_nickname FROM messages "
            f"WHERE {stream} ORDER BY created_at DESC, id DESC LIMIT {p}"
        ),
        "memories": (
            f"SELECT content FROM memories WHERE tenant_id = {p} AND agent_id = {p} "
            f"AND (platform IS NULL OR platform = {p}) AND (chat_stream_id IS NULL OR chat_stream_id = {p}) "
            f"ORDER BY created_at DESC, id LIMIT {p}"
        ),
        # PostgreSQL: a reply and its usage row in one round trip (a data-modifying CTE).
        "reply_and_usage": (
            f"WITH reply AS (INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({', '.join([p] * 13)}) "
            "ON CONFLICT (tenant_id, chat_stream_id, message_id) DO NOTHING RETURNING 1) "
            "INSERT INTO llm_usage (tenant_id, id, agent_id, platform, chat_stream_id, provider, model, "
            "prompt_tokens, completion_tokens, latency_ms, outcome, error, created_at) "
            f"VALUES ({', '.join([p] * 13)})"
        ),
        "usage": (
            "INSERT INTO llm_usage (tenant_id, id, agent_id, platform, chat_stream_id, provider, model, "
            "prompt_tokens, completion_tokens, latency_ms, outcome, error, created_at) "
            f"VALUES ({', '.join([p] * 13)})"
        ),
    }


def _prepare(ctx: IsolationContext) -> tuple[dict[str, str], tuple[str, str, str, str]]:
    ctx.require(Level.TACP)
    database = _db.database.obj
    if database is None:
        raise RuntimeError("database is not configured")
    if not database.in_transaction():
        raise RuntimeError("fastpath statements must run inside a transaction")
    _db.bind_tenant(ctx.tenant_id)
    return _sql(database.param), (ctx.tenant_id, ctx.agent_id, ctx.platform, ctx.chat_stream_id)


def _execute(sql: str, params: tuple):
    return _db.database.obj.execute_sql(sql, params)


class ChatSession:
    """The statements below for one T+A+C+P context, with the tenant bound once (PostgreSQL).

    Use it for a few statements in a row inside one transaction (one chat exchange); do not keep it
    across transactions. The module-level functions open a session per call.
    """

    __slots__ = ("_scope", "_sql", "ctx")

    def __init__(self, ctx: IsolationContext) -> None:
        self.ctx = ctx
        self._sql, self._scope = _prepare(ctx)

    def insert_message(self, **fields) -> bool:
        """Store a message of the context's chat stream; False when its message id is already stored.

        Fields: message_id, direction ("in"|"out"), text, segments, sender_user_id, sender_nickname,
        reply_to.
        """
        cursor = _execute(self._sql["insert_message"], self._message_params(**fields))
        return cursor.rowcount == 1

    def insert_reply_with_usage(self, reply: dict, usage: dict) -> None:
        """`insert_message(**reply)` and `record_usage(**usage)`; one statement on PostgreSQL."""
        if not _db.is_postgres():
            self.insert_message(**reply)
            self.record_usage(**usage)
            return
        _execute(
            self._sql["reply_and_usage"],
            self._message_params(**reply) + self._usage_params(**usage),
        )

    def _message_params(
        self,
        *,
        message_id: str,
        direction: str,
        text: str,
        segments,
        sender_user_id: str | None = None,
        sender_nickname: str | None = None,
        reply_to: str | None = None,
    ) -> tuple:
        if direction not in ("in", "out"):
            raise ValueError("direction must be 'in' or 'out'")
        for value in (message_id, text, sender_user_id, sender_nickname, reply_to):
            if value is not None and "\x00" in value:
                raise ValueError("text must not contain NUL (\\x00) characters")
        tenant, agent, platform, stream = self._scope
        return (
            tenant,
            new_id("msg"),
            agent,
            platform,
            stream,
            message_id,
            direction,
            sender_user_id,
            sender_nickname,
            text,
            json.dumps(segments, ensure_ascii=False, separators=(",", ":")),
            reply_to,
            utcnow(),
        )

    def _usage_params(
        self,
        *,
        provider: str,
        model: str,
        outcome: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_ms: int = 0,
        error: str | None = None,
    ) -> tuple:
        tenant, agent, platform, stream = self._scope
        return (
            tenant,
            new_id("use"),
            agent,
            platform,
            stream,
            provider,
            model,
            int(prompt_tokens),
            int(completion_tokens),
            int(latency_ms),
            outcome,
            error,
            utcnow(),
        )

    def message_text(self, message_id: str) -> str | None:
        """The text of one of the stream's messages by its message id, or None."""
        row = _execute(self._sql["message_text"], (*self._scope, message_id)).fetchone()
        return row[0] if row else None

    def recent_messages(self, limit: int) -> list[dict]:
        """The stream's last `limit` messages, oldest first (message_id, direction, text, sender ids)."""
        if limit < 1:
            return []
        rows = _execute(self._sql["recent"], (*self._scope, int(limit))).fetchall()
        keys = ("message_id", "direction", "text", "sender_user_id", "sender_nickname")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

    def relevant_memories(self, limit: int) -> list[str]:
        """Memory contents visible in this chat (agent-wide, this platform's, this chat's), oldest first."""
        if limit < 1:
            return []
        rows = _execute(self._sql["memories"], (*self._scope, int(limit))).fetchall()
        return [row[0] for row in reversed(rows)]

    def record_usage(self, **fields) -> None:
        """One `llm_usage` row for this chat stream (no read-back). Fields: provider, model, outcome,
        prompt_tokens, completion_tokens, latency_ms, error."""
        _execute(self._sql["usage"], self._usage_params(**fields))


def insert_message(ctx: IsolationContext, **fields) -> bool:
    return ChatSession(ctx).insert_message(**fields)


def message_text(ctx: IsolationContext, message_id: str) -> str | None:
    return ChatSession(ctx).message_text(message_id)


def recent_messages(ctx: IsolationContext, limit: int) -> list[dict]:
    return ChatSession(ctx).recent_messages(limit)


def relevant_memories(ctx: IsolationContext, limit: int) -> list[str]:
    return ChatSession(ctx).relevant_memories(limit)


def record_usage(ctx: IsolationContext, **fields) -> None:
    ChatSession(ctx).record_usage(**fields)
