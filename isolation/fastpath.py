"""The replier's per-message statements for one chat stream, without building peewee queries.

At thousands of chat messages per second building a peewee query costs far more than running it, so
these run the fixed statements of `isolation.managers.sql` (the module that holds every hand-written
tenant statement, and the one write path of messages and usage rows the scoped managers use too).
The guarantees are those of the scoped managers: every statement filters by the whole context
(tenant, agent, platform, chat stream), inserts take those columns from the context only, and on
PostgreSQL the tenant is bound to the transaction first (row-level security). They need a T+A+C+P
context and must run inside a transaction (`isolation.db.unit_of_work(write=True)`, or the replier
store's batch).
"""

from __future__ import annotations

from isolation import db as _db
from isolation.context import IsolationContext, Level
from isolation.managers import sql


class ChatSession:
    """The statements below for one T+A+C+P context, with the tenant bound once (PostgreSQL).

    Use it for a few statements in a row inside one transaction (one chat exchange); do not keep it
    across transactions.
    """

    __slots__ = ("_scope", "ctx")

    def __init__(self, ctx: IsolationContext) -> None:
        ctx.require(Level.TACP)
        database = _db.database.obj
        if database is None:
            raise RuntimeError("database is not configured")
        if not database.in_transaction():
            raise RuntimeError("fastpath statements must run inside a transaction")
        _db.bind_tenant(ctx.tenant_id)
        self.ctx = ctx
        self._scope: sql.Scope = (ctx.tenant_id, ctx.agent_id, ctx.platform, ctx.chat_stream_id)

    def insert_message(self, **fields) -> bool:
        """Store a message of the context's chat stream; False when its message id is already stored.

        Fields: message_id, direction ("in"|"out"), text, segments, sender_user_id, sender_nickname,
        reply_to.
        """
        return sql.insert_message(self._scope, fields)[1]

    def insert_reply_with_usage(self, reply: dict, usage: dict) -> bool:
        """`insert_message(**reply)` and `record_usage(**usage)`; one statement on PostgreSQL.

        False when the reply id was already stored: nothing is written (the database decides which
        answer to a message stands, across processes)."""
        return sql.insert_reply_with_usage(self._scope, reply, usage)

    def message_text(self, message_id: str) -> str | None:
        """The text of one of the stream's messages by its message id, or None."""
        return sql.message_text(self._scope, message_id)

    def set_platform_message_id(self, reply_id: str, platform_message_id: str) -> bool:
        """Store the platform's id of the stream's reply `reply_id` (from an adapter's echo); False
        when the stream has no such reply."""
        return sql.set_platform_message_id(self._scope, reply_id, platform_message_id)

    def recent_messages(self, limit: int) -> list[dict]:
        """The stream's last `limit` messages, oldest first (message_id, direction, text, sender ids)."""
        if limit < 1:
            return []
        keys = ("message_id", "direction", "text", "sender_user_id", "sender_nickname")
        return [dict(zip(keys, row, strict=True)) for row in reversed(sql.recent_messages(self._scope, limit))]

    def relevant_memories(self, limit: int) -> list[str]:
        """Memory contents visible in this chat (agent-wide, this platform's, this chat's), oldest first."""
        if limit < 1:
            return []
        return [row[0] for row in reversed(sql.relevant_memories(self._scope, limit))]

    def record_usage(self, **fields) -> None:
        """One `llm_usage` row for this chat stream (no read-back). Fields: provider, model, outcome,
        prompt_tokens, completion_tokens, latency_ms, error."""
        sql.insert_usage(self._scope, fields)
