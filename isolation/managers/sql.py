"""Every hand-written statement on tenant tables, in one module for review.

peewee builds the other queries. These are written out because they sit on hot paths where building
a peewee query costs several times more than running it: the membership lookup of every
authenticated configurator request, the configurator's agents page (also joined to the membership
lookup, so `GET /agents` is one statement), and the replier's per-message statements. They also
hold the one write path of `messages` and `llm_usage` rows, which the scoped managers
(`MessageManager.add`, `LlmUsageManager.record`) and the replier's `ChatSession` share.

What a reviewer checks, and what every statement here keeps:
* values only as parameters (`{p}` is the driver's placeholder), never formatted into the text;
* a WHERE clause with the whole scope of the caller's context (the tenant always, agent, platform and
  chat stream where the statement is about one), inserts taking those columns from the context;
* callers run them inside `isolation.db.unit_of_work(tenant)`, which binds the tenant on PostgreSQL,
  so row-level security applies as well (`ChatSession` binds itself).
The statement strings are built once per dialect (`lru_cache`) and reused.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from peewee import DateTimeField, Field

from isolation import db as _db
from isolation.ids import new_id, utcnow
from isolation.models import Membership, RefreshToken, Tenant, TenantModel, json_text, refuse_nul

# (tenant, agent, platform, chat stream): the columns every chat row takes from its context.
Scope = tuple[str, str, str, str | None]


def _execute(sql: str, params: tuple):
    return _db.database.obj.execute_sql(sql, params)


# ---- rows as dicts ---------------------------------------------------------------------------
def _decode_datetime(value: Any) -> Any:
    """SQLite hands back ISO text, PostgreSQL a `datetime`: both become a `datetime`."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:  # not ISO: leave it to peewee's own (slower) parser
            return DateTimeField().python_value(value)
    return value


def _decode_json(value: Any) -> Any:
    """JSON columns are text on both dialects (`json_text`)."""
    return json.loads(value) if isinstance(value, str) else value


def _decoder(field: Field):
    """What the peewee field would have returned for a raw column value (datetimes parsed faster)."""
    return _decode_datetime if isinstance(field, DateTimeField) else field.python_value


@lru_cache(maxsize=16)
def _public_columns(model: type[TenantModel], hidden: tuple[str, ...]):
    """(column SQL, result names, decoders) of a model's columns except `hidden`."""
    fields = [f for name, f in model._meta.fields.items() if name not in hidden]
    columns = ", ".join(f.column_name for f in fields)
    return columns, tuple(f.name for f in fields), tuple(_decoder(f) for f in fields)


def _as_dict(raw: tuple, names: tuple[str, ...], decoders: tuple) -> dict:
    return {name: decode(value) for name, decode, value in zip(names, decoders, raw, strict=False)}


# ---- memberships: checked by every authenticated configurator request ------------------------
@lru_cache(maxsize=4)
def _membership_sql(p: str, *, with_session: bool) -> str:
    columns, _, _ = _public_columns(Membership, ())
    if not with_session:
        return f"SELECT {columns} FROM {Membership._meta.table_name} WHERE tenant_id = {p} AND account_id = {p}"
    # The session check is an EXISTS inside the lookup: no extra round trip on the hot path. The
    # tenant's status and request limit (suspension and the per-tenant REST limit, checked on every
    # request) come from the same statement, by the tenants table's primary key.
    qualified = ", ".join("m." + column for column in columns.split(", "))
    return (
        f"SELECT {qualified}, EXISTS (SELECT 1 FROM {RefreshToken._meta.table_name} r "
        f"WHERE r.tenant_id = m.tenant_id AND r.session_id = {p} AND r.account_id = m.account_id "
        f"AND r.revoked_at IS NULL AND r.expires_at > {p}), t.status, t.limit_requests_per_minute "
        f"FROM {Membership._meta.table_name} m JOIN {Tenant._meta.table_name} t ON t.id = m.tenant_id "
        f"WHERE m.tenant_id = {p} AND m.account_id = {p}"
    )


def membership(tenant_id: str, account_id: str) -> dict | None:
    """The membership row of (`tenant_id`, `account_id`), or None."""
    _, names, decoders = _public_columns(Membership, ())
    params = (tenant_id, Membership.account_id.db_value(account_id))  # NUL refused, as elsewhere
    row = _execute(_membership_sql(_db.database.obj.param, with_session=False), params).fetchone()
    return None if row is None else _as_dict(row, names, decoders)


def membership_with_session(tenant_id: str, account_id: str, session_id: str) -> dict | None:
    """`membership()` plus `session_active`: whether the account's sign-in session `session_id`
    still has a refresh token that is neither revoked nor expired; and the tenant's `tenant_status`
    and `limit_requests_per_minute` override (None: the default)."""
    _, names, decoders = _public_columns(Membership, ())
    params = (
        RefreshToken.session_id.db_value(session_id),
        RefreshToken.expires_at.db_value(utcnow()),
        tenant_id,
        Membership.account_id.db_value(account_id),
    )
    row = _execute(_membership_sql(_db.database.obj.param, with_session=True), params).fetchone()
    if row is None:
        return None
    found = _as_dict(row, names, decoders)  # the last three columns are left out by zip(strict=False)
    return _with_session_columns(found, row[-3:])


def _with_session_columns(found: dict, extra: tuple) -> dict:
    """The membership row plus the session and tenant columns `_membership_sql(with_session=True)` adds."""
    session_active, status, request_limit = extra
    found["session_active"] = bool(session_active)
    found["tenant_status"] = status
    found["limit_requests_per_minute"] = None if request_limit is None else int(request_limit)
    return found


# ---- the agents page: the configurator's `GET /agents`, written as JSON by the database ------
def _agent_json_object(quote: str, timestamp: str) -> str:
    """SQL that writes an agent row as the API's agent object (`AgentOut`), as text.

    The JSON columns hold JSON text written by `json_text` (always valid, compact), so they are
    spliced in as they are instead of being parsed again; every other value goes through the
    dialect's JSON quoting. `quote`, `timestamp` are templates with `{column}`.
    """
    pairs = [
        ("id", quote.format(column="id")),
        ("name", quote.format(column="name")),
        ("description", quote.format(column="description")),
        ("template_id", f"coalesce({quote.format(column='template_id')}, 'null')"),
        ("persona", "persona"),
        ("config", "config"),
        ("llm", "llm"),
        ("has_api_key", "CASE WHEN llm_secret IS NULL THEN 'false' ELSE 'true' END"),
        ("status", quote.format(column="status")),
        ("version", "CAST(version AS TEXT)"),
        ("created_at", timestamp.format(column="created_at")),
        ("updated_at", timestamp.format(column="updated_at")),
    ]
    parts = [f"'{',' if i else '{'}\"{key}\":' || {value}" for i, (key, value) in enumerate(pairs)]
    return " || ".join(parts) + " || '}'"


# `{scope}` and `{p}` are filled in once per dialect. SQLite keeps a subquery's order in group_concat
# (3.44 would allow ORDER BY inside the aggregate; Python's bundled SQLite may be older), PostgreSQL
# orders inside string_agg. Stored timestamps are naive UTC; SQLite keeps them as the text
# "YYYY-MM-DD HH:MM:SS[.ffffff]".
_AGENT_PAGE_SQL = {
    "sqlite": (
        "SELECT (SELECT '[' || coalesce(group_concat(j, ','), '') || ']' FROM (SELECT "
        + _agent_json_object("json_quote({column})", "'\"' || replace({column}, ' ', 'T') || 'Z\"'")
        + " AS j FROM agents WHERE {scope} ORDER BY created_at, id LIMIT {p} OFFSET {p})), "
        "EXISTS (SELECT 1 FROM agents WHERE {scope} ORDER BY created_at, id LIMIT 1 OFFSET {p})"
    ),
    "postgresql": (
        "SELECT (SELECT '[' || coalesce(string_agg(j, ',' ORDER BY created_at, id), '') || ']' FROM (SELECT "
        "created_at, id, "
        + _agent_json_object(
            "to_json({column})::text", """'"' || to_char({column}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'"""
        )
        + " AS j FROM agents WHERE {scope} ORDER BY created_at, id LIMIT {p} OFFSET {p}) page), "
        "EXISTS (SELECT 1 FROM agents WHERE {scope} ORDER BY created_at, id LIMIT 1 OFFSET {p})"
    ),
}


@lru_cache(maxsize=8)
def _agent_page_sql(postgres: bool, p: str, *, by_agent: bool) -> str:
    """`_AGENT_PAGE_SQL` with the scope (the tenant, and the agent when the context names one)."""
    scope = f"tenant_id = {p}" + (f" AND id = {p}" if by_agent else "")
    template = _AGENT_PAGE_SQL["postgresql" if postgres else "sqlite"]
    return template.replace("{scope}", scope).replace("{p}", p)


@lru_cache(maxsize=4)
def _membership_with_agent_page_sql(postgres: bool, p: str) -> str:
    """`_membership_sql(with_session=True)` with the tenant's agent page (`_agent_page_sql`) as two
    more columns: the page's scalar subqueries are computed for the one membership row found, so a
    caller who is not a member gets no row and no page."""
    membership = _membership_sql(p, with_session=True)
    columns, _, tables = membership.rpartition(" FROM ")  # the outer FROM is the last one
    page_columns = _agent_page_sql(postgres, p, by_agent=False).removeprefix("SELECT ")
    # The page's own `tenant_id` references stay unqualified: they name `agents`' column inside its
    # subqueries (the membership's tables are aliased `m`, `t`).
    return f"{columns}, {page_columns} FROM {tables}"


def membership_with_agent_page(
    tenant_id: str, account_id: str, session_id: str, limit: int, offset: int
) -> tuple[dict, str, bool] | None:
    """`membership_with_session()` and, in the same statement, `agent_page()` of the tenant:
    (membership, JSON array, whether more follow), or None when the account is not a member. One
    round trip for the configurator's `GET /agents` (the caller checks the membership before it
    uses the page)."""
    _, names, decoders = _public_columns(Membership, ())
    page = (tenant_id, limit, offset, tenant_id, offset + limit)
    params = (
        RefreshToken.session_id.db_value(session_id),
        RefreshToken.expires_at.db_value(utcnow()),
        *page,
        tenant_id,
        Membership.account_id.db_value(account_id),
    )
    sql = _membership_with_agent_page_sql(_db.is_postgres(), _db.database.obj.param)
    row = _execute(sql, params).fetchone()
    if row is None:
        return None
    found = _with_session_columns(_as_dict(row, names, decoders), row[-5:-2])
    items, more = row[-2:]
    return found, items or "[]", bool(more)


def agent_page(tenant_id: str, agent_id: str | None, limit: int, offset: int) -> tuple[str, bool]:
    """(JSON array of `limit` agents from `offset`, whether more follow); one statement, one row."""
    scope = (tenant_id,) if agent_id is None else (tenant_id, agent_id)
    sql = _agent_page_sql(_db.is_postgres(), _db.database.obj.param, by_agent=agent_id is not None)
    items, more = _execute(sql, (*scope, limit, offset, *scope, offset + limit)).fetchone()
    return items or "[]", bool(more)


# ---- chat rows: the one write path of messages and usage, and the replier's reads ------------
_MESSAGE_COLUMNS = (
    "tenant_id, id, agent_id, platform, chat_stream_id, message_id, direction, "
    "sender_user_id, sender_nickname, text, segments, reply_to, content_hash, created_at"
)
_USAGE_COLUMNS = (
    "tenant_id, id, agent_id, platform, chat_stream_id, provider, model, "
    "prompt_tokens, completion_tokens, latency_ms, outcome, error, created_at"
)
_STREAM_FILTER = "tenant_id = {p} AND agent_id = {p} AND platform = {p} AND chat_stream_id = {p}"


@lru_cache(maxsize=2)
def _chat_sql(p: str) -> dict[str, str]:
    stream = _STREAM_FILTER.format(p=p)
    message_values = ", ".join([p] * 14)
    usage_values = ", ".join([p] * 13)
    insert_message = (
        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({message_values}) "
        "ON CONFLICT (tenant_id, chat_stream_id, message_id) DO NOTHING"
    )
    insert_usage = f"INSERT INTO llm_usage ({_USAGE_COLUMNS}) VALUES ({usage_values})"
    return {
        "insert_message": insert_message,
        "insert_usage": insert_usage,
        # PostgreSQL: a reply and its usage row in one round trip (a data-modifying CTE). The usage
        # row is written only when the reply was (an answer stored first by another process or a
        # recovery pass keeps its own usage row: nothing is counted twice).
        "reply_and_usage": (
            f"WITH reply AS ({insert_message} RETURNING 1) INSERT INTO llm_usage ({_USAGE_COLUMNS}) "
            f"SELECT {usage_values} WHERE EXISTS (SELECT 1 FROM reply)"
        ),
        # PostgreSQL: an inbound message and its (offline) answer in one round trip. The reply is
        # written only when the inbound row was (its id free), its usage row only when the reply was;
        # the counts say which. Nothing is written when the inbound id is taken.
        "exchange": (
            f"WITH inbound AS ({insert_message} RETURNING 1), "
            f"reply AS (INSERT INTO messages ({_MESSAGE_COLUMNS}) SELECT {message_values} "
            "WHERE EXISTS (SELECT 1 FROM inbound) "
            "ON CONFLICT (tenant_id, chat_stream_id, message_id) DO NOTHING RETURNING 1), "
            f"usage AS (INSERT INTO llm_usage ({_USAGE_COLUMNS}) SELECT {usage_values} "
            "WHERE EXISTS (SELECT 1 FROM reply) RETURNING 1) "
            "SELECT (SELECT count(*) FROM inbound), (SELECT count(*) FROM reply), (SELECT count(*) FROM usage)"
        ),
        "message_text": f"SELECT text FROM messages WHERE {stream} AND message_id = {p}",
        "platform_message_id": (
            f"UPDATE messages SET platform_message_id = {p} WHERE {stream} AND message_id = {p} AND direction = 'out'"
        ),
        "message_meta": f"SELECT content_hash, created_at FROM messages WHERE {stream} AND message_id = {p}",
        "inbound": (
            "SELECT m.text, m.segments, m.sender_user_id, m.sender_nickname, m.reply_to, m.created_at, "
            "s.group_id, s.user_id, s.group_name FROM messages m JOIN chat_streams s "
            "ON s.tenant_id = m.tenant_id AND s.agent_id = m.agent_id AND s.id = m.chat_stream_id "
            f"WHERE m.tenant_id = {p} AND m.agent_id = {p} AND m.platform = {p} AND m.chat_stream_id = {p} "
            f"AND m.message_id = {p} AND m.direction = 'in'"
        ),
        "recent": (
            "SELECT message_id, direction, text, sender_user_id, sender_nickname FROM messages "
            f"WHERE {stream} ORDER BY created_at DESC, id DESC LIMIT {p}"
        ),
        "memories": (
            f"SELECT content FROM memories WHERE tenant_id = {p} AND agent_id = {p} "
            f"AND (platform IS NULL OR platform = {p}) AND (chat_stream_id IS NULL OR chat_stream_id = {p}) "
            f"ORDER BY created_at DESC, id LIMIT {p}"
        ),
    }


def _chat_row(scope: Scope, kind: str, values: tuple, created_at: datetime | None = None) -> tuple:
    """A chat row's values in column order: the scope (and a new id) from the context, then `values`."""
    tenant, agent, platform, stream = scope
    return (tenant, new_id(kind), agent, platform, stream, *values, created_at or utcnow())


def _message_params(
    scope: Scope,
    *,
    message_id: str,
    direction: str,
    text: str,
    segments: Any,
    sender_user_id: str | None = None,
    sender_nickname: str | None = None,
    reply_to: str | None = None,
    content_hash: str | None = None,
    created_at: datetime | None = None,
) -> tuple:
    """The 14 values of a `messages` row; `InvalidValueError`/`ValueError` before anything is written."""
    if direction not in ("in", "out"):
        raise ValueError("direction must be 'in' or 'out'")
    for value in (message_id, text, sender_user_id, sender_nickname, reply_to, content_hash):
        refuse_nul(value)
    values = (message_id, direction, sender_user_id, sender_nickname, text, json_text(segments), reply_to, content_hash)
    return _chat_row(scope, "msg", values, created_at)


def _usage_params(
    scope: Scope,
    *,
    provider: str,
    model: str,
    outcome: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_ms: int = 0,
    error: str | None = None,
) -> tuple:
    """The 13 values of an `llm_usage` row (chat stream may be None: usage outside a chat)."""
    for value in (provider, model, outcome, error):
        refuse_nul(value)
    values = (provider, model, int(prompt_tokens), int(completion_tokens), int(latency_ms), outcome, error)
    return _chat_row(scope, "use", values)


def insert_message(scope: Scope, fields: dict) -> tuple[str, bool]:
    """Store a message (fields as `_message_params`); (new row id, False when the message id is
    already stored in the stream: the stored row stays)."""
    params = _message_params(scope, **fields)
    cursor = _execute(_chat_sql(_db.database.obj.param)["insert_message"], params)
    return params[1], cursor.rowcount == 1


def insert_usage(scope: Scope, fields: dict) -> str:
    """Store one `llm_usage` row (fields as `_usage_params`); its id."""
    params = _usage_params(scope, **fields)
    _execute(_chat_sql(_db.database.obj.param)["insert_usage"], params)
    return params[1]


def insert_reply_with_usage(scope: Scope, reply: dict, usage: dict) -> bool:
    """`insert_message(reply)` and, only when that inserted, `insert_usage(usage)`; one statement on
    PostgreSQL. False when the reply's message id was already stored (another process or a recovery
    pass answered first): nothing is written, the stored reply stands."""
    if not _db.is_postgres():
        if not insert_message(scope, reply)[1]:
            return False
        insert_usage(scope, usage)
        return True
    params = _message_params(scope, **reply) + _usage_params(scope, **usage)
    return _execute(_chat_sql(_db.database.obj.param)["reply_and_usage"], params).rowcount == 1


_MICROSECOND = timedelta(microseconds=1)


def insert_exchange(scope: Scope, inbound: dict, reply: dict, usage: dict) -> tuple[bool, bool]:
    """Store an inbound message (fields as `_message_params`) and, only when that inserted, its
    reply and, only when that inserted too, the reply's usage row; (inbound stored, reply stored).

    One statement on PostgreSQL (a data-modifying CTE: one round trip for the whole exchange). When
    the inbound id is already stored nothing is written: the caller takes the general path
    (`ChatSession.store_inbound`)."""
    # The inbound row keeps its given time (when it arrived), else now; the reply is at least one
    # microsecond younger: the history's order never depends on ids.
    received = inbound.get("created_at") or utcnow()
    inbound_params = _message_params(scope, **{**inbound, "created_at": received})
    reply_params = _message_params(scope, **reply, created_at=max(utcnow(), received + _MICROSECOND))
    usage_params = _usage_params(scope, **usage)
    if not _db.is_postgres():
        statements = _chat_sql(_db.database.obj.param)
        if _execute(statements["insert_message"], inbound_params).rowcount != 1:
            return False, False
        if _execute(statements["insert_message"], reply_params).rowcount != 1:
            return True, False
        _execute(statements["insert_usage"], usage_params)
        return True, True
    params = inbound_params + reply_params + usage_params
    stored_inbound, stored_reply, _ = _execute(_chat_sql(_db.database.obj.param)["exchange"], params).fetchone()
    return stored_inbound == 1, stored_reply == 1


def message_text(scope: Scope, message_id: str) -> str | None:
    row = _execute(_chat_sql(_db.database.obj.param)["message_text"], (*scope, message_id)).fetchone()
    return row[0] if row else None


def set_platform_message_id(scope: Scope, message_id: str, platform_message_id: str) -> bool:
    """Record the platform's id of one of the stream's replies (an adapter's echo); False: no such reply."""
    refuse_nul(platform_message_id)
    params = (platform_message_id, *scope, message_id)
    return _execute(_chat_sql(_db.database.obj.param)["platform_message_id"], params).rowcount == 1


def inbound_message(scope: Scope, message_id: str) -> dict | None:
    """One of the stream's inbound messages with its stream's peers (what a reply to it needs), or None."""
    row = _execute(_chat_sql(_db.database.obj.param)["inbound"], (*scope, message_id)).fetchone()
    if row is None:
        return None
    names = ("text", "segments", "sender_user_id", "sender_nickname", "reply_to", "created_at")
    found = dict(zip(names, row[:6], strict=True)) | dict(
        zip(("group_id", "user_id", "group_name"), row[6:], strict=True)
    )
    found["segments"] = _decode_json(found["segments"])
    found["created_at"] = _decode_datetime(found["created_at"])
    return found


# ---- delivery state: replies handed to a connection, and those still waiting for one ----------
_UNDELIVERED_SQL = (
    "SELECT r.platform, r.chat_stream_id, r.message_id, r.text, r.sender_nickname, r.reply_to, "
    "i.sender_user_id, i.sender_nickname, s.group_id, s.user_id, s.group_name "
    "FROM messages r JOIN chat_streams s "
    "ON s.tenant_id = r.tenant_id AND s.agent_id = r.agent_id AND s.id = r.chat_stream_id "
    "LEFT JOIN messages i ON i.tenant_id = r.tenant_id AND i.chat_stream_id = r.chat_stream_id "
    "AND i.message_id = r.reply_to "
    "WHERE r.tenant_id = {p} AND r.agent_id = {p} AND r.direction = 'out' AND r.delivered_at IS NULL "
    "AND r.created_at > {p}{platform} ORDER BY r.created_at, r.id LIMIT {p}"
)
_UNDELIVERED_NAMES = (
    "platform",
    "chat_stream_id",
    "message_id",
    "text",
    "agent_name",
    "reply_to",
    "user_id",
    "nickname",
    "group_id",
    "stream_user_id",
    "group_name",
)


@lru_cache(maxsize=4)
def _undelivered_sql(p: str, by_platform: bool) -> str:
    return _UNDELIVERED_SQL.format(p=p, platform=f" AND r.platform = {p}" if by_platform else "")


def undelivered_replies(tenant_id: str, agent_id: str, platform: str | None, since: datetime, limit: int) -> list[dict]:
    """The agent's replies (on `platform`, or every platform when None) stored after `since` and never
    handed to a connection, oldest first, with what a reply message needs about its inbound message."""
    scope = (tenant_id, agent_id, since) + ((platform,) if platform is not None else ())
    sql = _undelivered_sql(_db.database.obj.param, platform is not None)
    rows = _execute(sql, (*scope, int(limit))).fetchall()
    return [dict(zip(_UNDELIVERED_NAMES, row, strict=True)) for row in rows]


@lru_cache(maxsize=2)
def _mark_delivered_sql(p: str) -> str:
    # One reply per row of the batch, by the unique key's columns (tenant, chat stream, message id)
    # plus the rest of its context: an index lookup each. A multi-row `IN (VALUES ...)` form made
    # PostgreSQL hash-join the tenant's whole message table (43% of the replier's throughput at 50
    # clients, measured with perf.bench_replier).
    return (
        f"UPDATE messages SET delivered_at = {p} WHERE tenant_id = {p} AND chat_stream_id = {p} "
        f"AND message_id = {p} AND agent_id = {p} AND platform = {p} AND direction = 'out' "
        "AND delivered_at IS NULL"
    )


def mark_delivered(tenant_id: str, replies: list[tuple[str, str, str, str]], when: datetime) -> None:
    """Set `delivered_at` of the tenant's replies (agent, platform, chat stream, reply message id); a
    reply marked already keeps its first time. One `executemany`: psycopg sends the whole batch in
    one round trip (pipeline mode), SQLite runs it in process."""
    if not replies:
        return
    rows = [
        (when, tenant_id, stream, message_id, agent_id, platform)
        for agent_id, platform, stream, message_id in dict.fromkeys(replies)
    ]
    cursor = _db.database.obj.cursor()
    try:
        cursor.executemany(_mark_delivered_sql(_db.database.obj.param), rows)
    finally:
        cursor.close()


def message_meta(scope: Scope, message_id: str) -> tuple[str | None, datetime] | None:
    """(content hash, created at) of one of the stream's messages by its message id, or None."""
    row = _execute(_chat_sql(_db.database.obj.param)["message_meta"], (*scope, message_id)).fetchone()
    return None if row is None else (row[0], _decode_datetime(row[1]))


def recent_messages(scope: Scope, limit: int) -> list[tuple]:
    """(message_id, direction, text, sender_user_id, sender_nickname) of the last `limit`, newest first."""
    return _execute(_chat_sql(_db.database.obj.param)["recent"], (*scope, int(limit))).fetchall()


def relevant_memories(scope: Scope, limit: int) -> list[tuple]:
    """(content,) of the memories visible in the chat, newest first."""
    return _execute(_chat_sql(_db.database.obj.param)["memories"], (*scope, int(limit))).fetchall()
