"""Delivery state and adapter facts on chat messages (faults and real adapters).

Three nullable columns on `messages`, portable DDL on both dialects (the row-level security policy of
`messages`, by tenant, covers them as it is):

- `delivered_at` (reply rows): when the reply was handed to a connection. A stored reply with no
  `delivered_at` was produced but never sent (a crash or a disconnect in between) and is delivered
  when a connection of its stream is back.
- `content_hash` (inbound rows): SHA-256 of the message's content, so that only an identical resend
  of a message id is a replay; the same id with other content is a new message.
- `platform_message_id` (reply rows): the platform's own id of a delivered reply, as an adapter's
  `notify`/echo message reports it.
"""

from __future__ import annotations

VERSION = 4
NAME = "messages: delivery state, content hash, platform message id"


def _statements(dialect: str) -> list[str]:
    ts = "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
    return [
        f"ALTER TABLE messages ADD COLUMN delivered_at {ts}",
        "ALTER TABLE messages ADD COLUMN content_hash VARCHAR(64)",
        "ALTER TABLE messages ADD COLUMN platform_message_id VARCHAR(128)",
    ]


def apply(conn, dialect: str, app_role: str | None) -> None:
    for statement in _statements(dialect):
        conn.execute_sql(statement)
