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

import secrets
from datetime import datetime

from isolation import db as _db
from isolation.context import IsolationContext, Level
from isolation.ids import utcnow
from isolation.managers import sql

# A reused message id with new content is stored under `<id>#<suffix>`; ids are cut to this many
# characters first, so that `mt-reply:<stored id>` stays within the 128 characters of `message_id`.
DERIVED_ID_BASE_CHARS = 80


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if not number:
            return text


def inbound_id_candidates(message_id: str, content_hash: str, now: datetime, window_seconds: float) -> list[str]:
    """The ids an inbound message may be stored under, in the order they are tried.

    1. the client's `message_id`;
    2. `<id>#<first 16 hex of the content hash>`: the same id with other content;
    3. `<id>#<hash16>.<window>`, `window` = the number of whole replay windows since the epoch (base
       36): the same id and content again, after the replay window.
    All three are deterministic, so concurrent processes compute the same ids and the unique key
    (tenant, chat stream, message id) decides which one stores the message.
    """
    base = f"{message_id[:DERIVED_ID_BASE_CHARS]}#{content_hash[:16]}"
    ids = [message_id, base]
    if window_seconds > 0:
        ids.append(f"{base}.{_base36(int(now.timestamp() // window_seconds))}")
    return ids


class ChatSession:
    """The statements below for one T+A+C+P context, with the tenant bound once (PostgreSQL).

    Use it for a few statements in a row inside one transaction (one chat exchange); do not keep it
    across transactions.
    """

    __slots__ = ("_scope", "ctx")

    def __init__(self, ctx: IsolationContext) -> None:
        _bound(ctx, Level.TACP)
        self.ctx = ctx
        self._scope: sql.Scope = (ctx.tenant_id, ctx.agent_id, ctx.platform, ctx.chat_stream_id)

    def insert_message(self, **fields) -> bool:
        """Store a message of the context's chat stream; False when its message id is already stored.

        Fields: message_id, direction ("in"|"out"), text, segments, sender_user_id, sender_nickname,
        reply_to.
        """
        return sql.insert_message(self._scope, fields)[1]

    def store_inbound(self, *, content_hash: str, replay_window: float, **fields) -> tuple[str, bool]:
        """Store an inbound message unless it is a replay; (the id it is stored under, whether new).

        A replay is the same message id with the same content (`content_hash`; a stored row without
        a hash counts as the same) stored less than `replay_window` seconds ago: nothing is written
        and the stored row's id comes back. Anything else is a new message: the client's id if free,
        else a derived id (`inbound_id_candidates`), else `<id>#<random>`. Fields as `insert_message`.
        """
        message_id = fields.pop("message_id")
        now = utcnow()
        for candidate in inbound_id_candidates(message_id, content_hash, now, replay_window):
            if sql.insert_message(self._scope, {**fields, "message_id": candidate, "content_hash": content_hash})[1]:
                return candidate, True
            stored = sql.message_meta(self._scope, candidate)
            if stored is None:  # pragma: no cover - deleted between the two statements (history cleanup)
                continue
            stored_hash, created_at = stored
            if stored_hash in (None, content_hash) and (now - created_at).total_seconds() <= replay_window:
                return candidate, False
        candidate = f"{message_id[:DERIVED_ID_BASE_CHARS]}#{secrets.token_hex(8)}"
        sql.insert_message(self._scope, {**fields, "message_id": candidate, "content_hash": content_hash})
        return candidate, True

    def store_exchange(self, *, content_hash: str, inbound: dict, reply: dict, usage: dict) -> tuple[bool, bool]:
        """Store a new inbound message under its client's id together with its reply and usage row
        (one statement on PostgreSQL); (inbound stored, reply stored). When the id is taken nothing
        is written and the caller stores the message by `store_inbound` instead. Fields as
        `insert_message` (`inbound` without the content hash) and `record_usage`."""
        return sql.insert_exchange(self._scope, {**inbound, "content_hash": content_hash}, reply, usage)

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

    def inbound_message(self, message_id: str) -> dict | None:
        """One inbound message of the stream (text, segments, sender, time) with its stream's peers
        (group_id, user_id, group_name), or None: what answering it again needs (recovery)."""
        return sql.inbound_message(self._scope, message_id)

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


def _bound(ctx: IsolationContext, level: Level) -> None:
    """Check the context's level, that a transaction is open, and bind its tenant (PostgreSQL)."""
    ctx.require(level)
    database = _db.database.obj
    if database is None:
        raise RuntimeError("database is not configured")
    if not database.in_transaction():
        raise RuntimeError("fastpath statements must run inside a transaction")
    _db.bind_tenant(ctx.tenant_id)


def mark_delivered(
    ctx: IsolationContext, replies: list[tuple[str, str, str, str]], when: datetime | None = None
) -> None:
    """Record that these replies of the tenant `ctx` were handed to a connection: (agent, platform,
    chat stream, reply message id) each, one indexed statement per reply in one batch."""
    _bound(ctx, Level.T)
    sql.mark_delivered(ctx.tenant_id, replies, when or utcnow())


def undelivered_replies(ctx: IsolationContext, platform: str | None, since: datetime, limit: int) -> list[dict]:
    """The T+A context's agent's replies stored after `since` and never handed to a connection (on
    `platform`, or all when None), oldest first (see `sql.undelivered_replies`)."""
    _bound(ctx, Level.TA)
    return sql.undelivered_replies(ctx.tenant_id, ctx.agent_id, platform, since, limit)
