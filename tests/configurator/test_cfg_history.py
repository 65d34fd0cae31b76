"""Chat streams, messages (paginated), memories and history deletion."""

from __future__ import annotations

from cfg_helpers import create_agent, seed_history

from isolation import Scoped


def test_chat_streams_and_messages(client, owner, agent):
    seeded = seed_history(owner, agent["id"], messages=5)
    seed_history(owner, agent["id"], messages=1, group="43")
    streams = client.get(f"/api/v1/agents/{agent['id']}/chat-streams", headers=owner.headers)
    assert streams.status_code == 200
    ids = {s["id"] for s in streams.json()["items"]}
    assert seeded["stream"]["id"] in ids and len(ids) == 2
    stream = next(s for s in streams.json()["items"] if s["id"] == seeded["stream"]["id"])
    assert stream["platform"] == "qq" and stream["kind"] == "group" and stream["group_id"] == "42"

    path = f"/api/v1/chat-streams/{seeded['stream']['id']}/messages"
    first = client.get(f"{path}?limit=2", headers=owner.headers).json()
    assert [m["text"] for m in first["items"]] == ["hello 4", "hello 3"] and first["next_offset"] == 2
    rest = client.get(f"{path}?limit=10&offset=2", headers=owner.headers).json()
    assert [m["text"] for m in rest["items"]] == ["hello 2", "hello 1", "hello 0"] and rest["next_offset"] is None
    assert rest["items"][0]["segments"] == [{"type": "text"}]
    assert client.get("/api/v1/chat-streams/cs_missing/messages", headers=owner.headers).status_code == 404


def test_memories_add_list_delete(client, owner, agent):
    seeded = seed_history(owner, agent["id"], messages=1)
    base = f"/api/v1/agents/{agent['id']}/memories"
    plain = client.post(base, json={"content": "likes 茶 & <b>tea</b>"}, headers=owner.headers)
    assert plain.status_code == 201 and plain.json()["level"] == "agent"
    assert plain.json()["content"] == "likes 茶 & <b>tea</b>"
    platform = client.post(base, json={"content": "on qq", "platform": "qq"}, headers=owner.headers).json()
    assert platform["level"] == "platform" and platform["platform"] == "qq"
    chat = client.post(
        base, json={"content": "in chat", "chat_stream_id": seeded["stream"]["id"]}, headers=owner.headers
    )
    assert chat.status_code == 201 and chat.json()["level"] == "chat"
    for body in (
        {"content": "x", "level": "chat"},
        {"content": "x", "level": "platform"},
        {"content": ""},
        {"content": "x", "platform": "bad platform"},
    ):
        response = client.post(base, json=body, headers=owner.headers)
        assert response.status_code == 422, body
    foreign_stream = client.post(base, json={"content": "x", "chat_stream_id": "cs_nope"}, headers=owner.headers)
    assert foreign_stream.status_code == 404

    listed = client.get(base, headers=owner.headers).json()
    assert len(listed["items"]) == 4  # three here plus the seeded chat memory
    only_agent = client.get(f"{base}?level=agent", headers=owner.headers).json()["items"]
    assert [m["id"] for m in only_agent] == [plain.json()["id"]]

    one = client.delete(f"{base}/{plain.json()['id']}", headers=owner.headers)
    assert one.status_code == 204
    assert client.delete(f"{base}/{plain.json()['id']}", headers=owner.headers).status_code == 404
    everything = client.delete(base, headers=owner.headers)
    assert everything.status_code == 200 and everything.json() == {"deleted": 3}
    assert client.get(base, headers=owner.headers).json()["items"] == []


def test_memory_of_another_agent_is_not_reachable_through_this_agent(client, owner, agent):
    other = create_agent(client, owner)
    memory = client.post(f"/api/v1/agents/{other['id']}/memories", json={"content": "x"}, headers=owner.headers).json()
    response = client.delete(f"/api/v1/agents/{agent['id']}/memories/{memory['id']}", headers=owner.headers)
    assert response.status_code == 404
    assert len(client.get(f"/api/v1/agents/{other['id']}/memories", headers=owner.headers).json()["items"]) == 1


def test_delete_history_counts_and_keeps_agent_and_keys(client, owner, agent):
    from cfg_helpers import create_key

    key = create_key(client, owner, agent["id"])
    other = create_agent(client, owner)
    seed_history(owner, other["id"], messages=2)
    seed_history(owner, agent["id"], messages=3)
    response = client.delete(f"/api/v1/agents/{agent['id']}/history", headers=owner.headers)
    assert response.status_code == 200
    assert response.json()["deleted"] == {"llm_usage": 1, "memories": 1, "messages": 3, "chat_streams": 1}
    assert client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).status_code == 200
    keys = client.get(f"/api/v1/agents/{agent['id']}/api-keys", headers=owner.headers).json()["items"]
    assert [k["id"] for k in keys] == [key["id"]]
    assert client.get(f"/api/v1/agents/{agent['id']}/chat-streams", headers=owner.headers).json()["items"] == []
    # the other agent's history is untouched
    assert len(client.get(f"/api/v1/agents/{other['id']}/chat-streams", headers=owner.headers).json()["items"]) == 1
    assert client.delete("/api/v1/agents/agt_missing/history", headers=owner.headers).status_code == 404


def test_isolation_additions_directly(client, owner, agent):
    """The two helpers added to isolation for the configurator, tested at their own level."""
    scoped = Scoped(owner.ctx)
    plain = create_agent(client, owner)
    keyed = create_agent(client, owner, llm={"api_key": "sk-test"})
    rows = scoped.agents.list_with_key_flags(limit=100)
    flags = {r["id"]: r["has_api_key"] for r in rows}
    assert flags[plain["id"]] is False and flags[keyed["id"]] is True
    assert all("llm_secret" not in r and "encrypted_api_key" not in r for r in rows)
    assert [r["id"] for r in rows] == [r["id"] for r in scoped.agents.list(limit=100)]
    assert [r["id"] for r in scoped.agents.list_with_key_flags(limit=1, offset=1)] == [rows[1]["id"]]
    from cfg_helpers import register

    stranger = register(client)
    assert Scoped(stranger.ctx).agents.list_with_key_flags() == []

    seeded = seed_history(owner, agent["id"], messages=3)
    stream_ctx = scoped.chat_streams.context_for(seeded["stream"]["id"])
    page = Scoped(stream_ctx).messages.page(limit=2, offset=1)
    assert [m["text"] for m in page] == ["hello 1", "hello 0"]
    import pytest

    from isolation import IsolationViolationError

    with pytest.raises(IsolationViolationError):
        scoped.messages.page()


def test_a_replys_platform_message_id_from_an_adapters_echo_is_in_the_history(client, owner, agent):
    """The replier stores the id an adapter's echo reports (isolation.fastpath); the API shows it."""
    from isolation import db as isolation_db
    from isolation.fastpath import ChatSession

    seeded = seed_history(owner, agent["id"], messages=1)
    stream_ctx = owner.ctx.child(agent_id=agent["id"], platform="qq", chat_stream_id=seeded["stream"]["id"])
    Scoped(stream_ctx).messages.add(message_id="mt-reply:m0", direction="out", text="hi", segments={"type": "text"})
    with isolation_db.unit_of_work(owner.ctx.tenant_id, write=True):
        session = ChatSession(stream_ctx)
        assert session.set_platform_message_id("mt-reply:m0", "900001") is True
        assert session.set_platform_message_id("m0", "1") is False  # only replies (direction out)
        assert session.set_platform_message_id("mt-reply:nope", "2") is False
    other_ctx = owner.ctx.child(agent_id=agent["id"], platform="wechat", chat_stream_id=seeded["stream"]["id"])
    with isolation_db.unit_of_work(owner.ctx.tenant_id, write=True):
        assert ChatSession(other_ctx).set_platform_message_id("mt-reply:m0", "3") is False  # another platform
    items = client.get(f"/api/v1/chat-streams/{seeded['stream']['id']}/messages", headers=owner.headers).json()["items"]
    by_id = {m["message_id"]: m["platform_message_id"] for m in items}
    assert by_id == {"mt-reply:m0": "900001", "m0": None}
