"""Open connections and which chat streams they speak in.

Connection ids are generated here (never the client's `x-uuid`). The stream index is keyed by the
full context (tenant, agent, platform, chat stream), so a reply can only reach connections that
authenticated as that tenant's agent and spoke in that very stream.

A reply goes to exactly one connection (`reply_target`): the one that sent the message; if it is
gone, one other connection of the stream (same protocol and platform first); if the stream has none,
one connection of the agent on that platform (an adapter serves every chat of its platform: this is
how a reply made after a restart, by recovery, reaches the adapter that reconnected). Never several:
two adapters of one agent in one group would both post it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

StreamKey = tuple[str, str, str, str]  # tenant, agent, platform, chat stream


@dataclass(slots=True, eq=False)
class Connection:
    sid: str
    connection_id: str
    protocol: str  # "api" | "legacy"
    key_id: str
    tenant_id: str
    agent_id: str
    platform: str | None
    api_key: str  # echoed in replies' message_dim to this connection only
    connected_at: float = field(default_factory=time.time)
    streams: set = field(default_factory=set)


def new_connection_id() -> str:
    return "conn_" + secrets.token_urlsafe(12)


class ConnectionRegistry:
    def __init__(self) -> None:
        self.by_sid: dict[str, Connection] = {}
        self.by_stream: dict[StreamKey, set[str]] = {}

    def __len__(self) -> int:
        return len(self.by_sid)

    def add(self, conn: Connection) -> None:
        self.by_sid[conn.sid] = conn

    def get(self, sid: str) -> Connection | None:
        return self.by_sid.get(sid)

    def remove(self, sid: str) -> Connection | None:
        conn = self.by_sid.pop(sid, None)
        if conn is None:
            return None
        for key in conn.streams:
            sids = self.by_stream.get(key)
            if sids is not None:
                sids.discard(sid)
                if not sids:
                    del self.by_stream[key]
        return conn

    def subscribe(self, conn: Connection, key: StreamKey) -> None:
        if key[0] != conn.tenant_id or key[1] != conn.agent_id:
            raise ValueError("a connection can only join its own tenant's and agent's streams")
        if key not in conn.streams:
            conn.streams.add(key)
            self.by_stream.setdefault(key, set()).add(conn.sid)

    def targets(self, key: StreamKey) -> list[Connection]:
        sids = self.by_stream.get(key)
        if not sids:
            return []
        conns = []
        for sid in sids:
            conn = self.by_sid.get(sid)
            if conn is not None and conn.tenant_id == key[0] and conn.agent_id == key[1]:
                conns.append(conn)
        return conns

    def reply_target(
        self, key: StreamKey, sid: str | None, protocol: str | None = None, platform: str | None = None
    ) -> Connection | None:
        """The one connection a reply in stream `key` goes to (see the module docstring), or None.

        `sid` is the sender's connection (None for a recovered message); `protocol` and `platform`
        are the original message's, used to prefer a connection that speaks like the sender.
        """
        tenant_id, agent_id = key[0], key[1]
        if sid is not None:
            conn = self.by_sid.get(sid)
            if conn is not None and conn.tenant_id == tenant_id and conn.agent_id == agent_id:
                return conn
        platform = platform or key[2]
        candidates = self.targets(key)
        if not candidates:
            candidates = [
                c
                for c in self.by_sid.values()
                if c.tenant_id == tenant_id and c.agent_id == agent_id and c.platform == platform
            ]
        if not candidates:
            return None
        # Deterministic: the best match, then the longest-connected (its streams are the stablest).
        return min(
            candidates,
            key=lambda c: (c.protocol != protocol, c.platform != platform, c.connected_at, c.connection_id),
        )

    def keys_by_tenant(self) -> dict[str, set[str]]:
        """Key ids of open connections grouped by tenant (for revocation checks)."""
        result: dict[str, set[str]] = {}
        for conn in self.by_sid.values():
            result.setdefault(conn.tenant_id, set()).add(conn.key_id)
        return result

    def with_key(self, tenant_id: str, key_id: str) -> list[Connection]:
        return [c for c in self.by_sid.values() if c.tenant_id == tenant_id and c.key_id == key_id]
