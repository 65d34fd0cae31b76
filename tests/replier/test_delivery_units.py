"""The delivery rules in isolation: which one connection a reply goes to."""

from __future__ import annotations

from replier.connections import Connection, ConnectionRegistry

KEY = ("ten_a", "agt_a", "qq", "cs_1")


def _conn(
    registry: ConnectionRegistry, sid: str, protocol: str = "api", platform: str | None = "qq", **kw
) -> Connection:
    conn = Connection(
        sid, f"conn_{sid}", protocol, "key_1", kw.get("tenant", "ten_a"), kw.get("agent", "agt_a"), platform, "k"
    )
    registry.add(conn)
    return conn


def test_a_reply_goes_to_its_sender_else_to_exactly_one_other_connection():
    registry = ConnectionRegistry()
    sender = _conn(registry, "s1")
    legacy = _conn(registry, "s2", protocol="legacy")
    api = _conn(registry, "s3")
    for conn in (sender, legacy, api):
        registry.subscribe(conn, KEY)
    assert registry.reply_target(KEY, "s1", "api", "qq") is sender
    registry.remove("s1")
    # The sender is gone: one other connection, speaking the sender's protocol first.
    assert registry.reply_target(KEY, "s1", "api", "qq") is api
    assert registry.reply_target(KEY, "s1", "legacy", "qq") is legacy
    registry.remove("s3")
    assert registry.reply_target(KEY, "s1", "api", "qq") is legacy


def test_without_a_connection_in_the_stream_one_of_the_agent_on_that_platform_gets_it():
    registry = ConnectionRegistry()
    _conn(registry, "other-platform", platform="wechat")
    _conn(registry, "other-agent", agent="agt_b")
    _conn(registry, "other-tenant", tenant="ten_b")
    assert registry.reply_target(KEY, None) is None
    adapter = _conn(registry, "adapter")
    assert registry.reply_target(KEY, None) is adapter
    # A sender id of another tenant's connection is never a target.
    assert registry.reply_target(KEY, "other-tenant") is adapter
