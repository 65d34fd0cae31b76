"""Recovery of the replier's unfinished work: unanswered messages and undelivered replies.

- `messages_inbound_time` (both dialects): inbound rows by time, so that the replier's recovery pass
  (inbound messages younger than its recovery age with no reply) reads only the last minutes, not the
  table. Partial on `direction = 'in'`.
- `messages_undelivered` (both dialects): the replies not yet handed to a connection, by tenant, agent
  and time; partial on `direction = 'out' AND delivered_at IS NULL`, so it holds only the few replies
  waiting for their connection (a delivered reply leaves it).
- PostgreSQL: `mt_unanswered_messages(p_oldest, p_newest, p_limit)`, a `SECURITY DEFINER` function
  (the pattern of `mt_lookup_api_key`): the recovery pass runs before any tenant is known, and the
  application role is under row-level security. It returns only the keys of inbound messages created
  in (`p_oldest`, `p_newest`] with no stored reply and an active agent: tenant, agent, platform, chat
  stream, message id and creation time (no text), oldest first, at most `p_limit` (capped at 1000).
  The replier then reads each message in its own tenant's context.
"""

from __future__ import annotations

VERSION = 5
NAME = "recovery: unanswered and undelivered messages"

# Granted to the application role by `isolation.migrate._grant_app_role` (re-run at every upgrade).
FUNCTION_SIGNATURES = ("mt_unanswered_messages(TIMESTAMP, TIMESTAMP, INTEGER)",)

_INDEXES = [
    "CREATE INDEX messages_inbound_time ON messages (created_at) WHERE direction = 'in'",
    "CREATE INDEX messages_undelivered ON messages (tenant_id, agent_id, created_at) "
    "WHERE direction = 'out' AND delivered_at IS NULL",
]

_FUNCTION = """CREATE FUNCTION mt_unanswered_messages(p_oldest TIMESTAMP, p_newest TIMESTAMP, p_limit INTEGER)
RETURNS TABLE (tenant_id VARCHAR, agent_id VARCHAR, platform VARCHAR, chat_stream_id VARCHAR,
               message_id VARCHAR, created_at TIMESTAMP)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT m.tenant_id, m.agent_id, m.platform, m.chat_stream_id, m.message_id, m.created_at
    FROM messages m
    JOIN agents a ON a.tenant_id = m.tenant_id AND a.id = m.agent_id AND a.status = 'active'
    WHERE m.direction = 'in' AND m.created_at > p_oldest AND m.created_at <= p_newest
      AND NOT EXISTS (
          SELECT 1 FROM messages r
          WHERE r.tenant_id = m.tenant_id AND r.chat_stream_id = m.chat_stream_id
            AND r.message_id = 'mt-reply:' || m.message_id
      )
    ORDER BY m.created_at, m.tenant_id, m.id
    LIMIT least(greatest(p_limit, 0), 1000)
$$"""


def apply(conn, dialect: str, app_role: str | None) -> None:
    for statement in _INDEXES:
        conn.execute_sql(statement)
    if dialect == "postgresql":
        conn.execute_sql(_FUNCTION)
        conn.execute_sql(f"REVOKE ALL ON FUNCTION {FUNCTION_SIGNATURES[0]} FROM PUBLIC")
