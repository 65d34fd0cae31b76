"""`isolation.fastpath` from the isolation suite: scoping, idempotence, refusals, both dialects."""

from __future__ import annotations

import pytest

from isolation import IsolationContext, Scoped, fastpath
from isolation import db as isolation_db
from isolation.errors import IsolationViolationError
from tests.isolation.conftest import make_tenant


def _stream_ctx(tenant_id: str, agent_id: str, platform: str, user_id: str) -> IsolationContext:
    row = Scoped(IsolationContext(tenant_id, agent_id, platform)).chat_streams.get_or_create(user_id=user_id)
    return IsolationContext(tenant_id, agent_id, platform, row["id"])


@pytest.fixture
def streams(db):
    tenant_a, agents_a, _ = make_tenant(2)
    tenant_b, agents_b, _ = make_tenant(1)
    return {
        "a": _stream_ctx(tenant_a, agents_a[0], "qq", "u1"),
        "a_other_agent": _stream_ctx(tenant_a, agents_a[1], "qq", "u1"),
        "a_wechat": _stream_ctx(tenant_a, agents_a[0], "wechat", "u1"),
        "b": _stream_ctx(tenant_b, agents_b[0], "qq", "u1"),
    }


def test_sessions_store_and_read_only_their_stream(streams):
    a, b = streams["a"], streams["b"]
    with isolation_db.unit_of_work(write=True):
        assert fastpath.ChatSession(a).insert_message(
            message_id="m1", direction="in", text="hi", segments=[{"t": "文"}]
        )
        assert not fastpath.ChatSession(a).insert_message(message_id="m1", direction="in", text="replayed", segments=[])
        assert fastpath.ChatSession(a).insert_message(
            message_id="m2", direction="out", text="yo", segments=[], sender_user_id="bot", reply_to="m1"
        )
        fastpath.ChatSession(a).record_usage(provider="offline", model="offline", outcome="offline", prompt_tokens=3)
        # Same message id in another tenant's stream and in a sibling agent's stream: separate rows.
        assert fastpath.ChatSession(b).insert_message(message_id="m1", direction="in", text="b's", segments=[])
        assert fastpath.ChatSession(streams["a_other_agent"]).insert_message(
            message_id="m1", direction="in", text="x", segments=[]
        )
    with isolation_db.unit_of_work(write=True):
        assert fastpath.ChatSession(a).message_text("m1") == "hi"
        assert fastpath.ChatSession(b).message_text("m1") == "b's"
        assert fastpath.ChatSession(a).message_text("missing") is None
        recent = fastpath.ChatSession(a).recent_messages(10)
        assert [(m["message_id"], m["direction"], m["text"]) for m in recent] == [
            ("m1", "in", "hi"),
            ("m2", "out", "yo"),
        ]
        assert recent[1]["sender_user_id"] == "bot"
        assert fastpath.ChatSession(a).recent_messages(0) == []
    stored = Scoped(a).messages.by_message_id("m1")
    assert stored["segments"] == [{"t": "文"}] and stored["tenant_id"] == a.tenant_id
    usage = Scoped(a).llm_usage.list()
    assert [(u["provider"], u["prompt_tokens"], u["chat_stream_id"]) for u in usage] == [
        ("offline", 3, a.chat_stream_id)
    ]
    assert Scoped(b).llm_usage.list() == []


def test_memories_visible_in_a_chat_are_agent_platform_and_chat_wide_only(streams):
    a = streams["a"]
    Scoped(a.child()).memories.add("agent wide", level="agent")
    Scoped(IsolationContext(a.tenant_id, a.agent_id, "qq")).memories.add("qq wide", level="platform")
    Scoped(a).memories.add("this chat", level="chat")
    Scoped(streams["a_wechat"]).memories.add("wechat chat", level="chat")
    Scoped(IsolationContext(a.tenant_id, a.agent_id, "wechat")).memories.add("wechat wide", level="platform")
    Scoped(streams["a_other_agent"]).memories.add("sibling agent", level="chat")
    Scoped(streams["b"]).memories.add("tenant b", level="chat")
    with isolation_db.unit_of_work(write=True):
        assert sorted(fastpath.ChatSession(a).relevant_memories(10)) == ["agent wide", "qq wide", "this chat"]
        assert len(fastpath.ChatSession(a).relevant_memories(2)) == 2
        assert fastpath.ChatSession(a).relevant_memories(0) == []
        assert fastpath.ChatSession(streams["b"]).relevant_memories(10) == ["tenant b"]


def test_reply_with_usage_writes_both_rows_in_the_stream(streams):
    a = streams["a"]
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(a)
        assert session.insert_reply_with_usage(
            {"message_id": "r1", "direction": "out", "text": "answer", "segments": [], "sender_nickname": "bot"},
            {"provider": "openai", "model": "m", "outcome": "error", "error": "HTTP 500", "latency_ms": 12},
        )
        # A second answer to the same message (another process, a recovery pass) is not stored: the
        # first text stays, the insert says so, and its usage row is not counted.
        assert not session.insert_reply_with_usage(
            {"message_id": "r1", "direction": "out", "text": "other", "segments": []},
            {"provider": "openai", "model": "m", "outcome": "ok", "completion_tokens": 4},
        )
        assert session.insert_reply_with_usage(
            {"message_id": "r2", "direction": "out", "text": "second", "segments": []},
            {"provider": "openai", "model": "m", "outcome": "ok", "completion_tokens": 4},
        )
    reply = Scoped(a).messages.by_message_id("r1")
    assert (reply["text"], reply["direction"], reply["sender_nickname"]) == ("answer", "out", "bot")
    usage = sorted(Scoped(a).llm_usage.list(), key=lambda u: u["outcome"])
    assert [(u["outcome"], u["error"], u["latency_ms"], u["completion_tokens"]) for u in usage] == [
        ("error", "HTTP 500", 12, 0),
        ("ok", None, 0, 4),
    ]
    assert Scoped(streams["b"]).messages.count() == 0


def test_bad_input_and_wrong_context_are_refused_before_any_write(streams):
    a = streams["a"]
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(a)
        with pytest.raises(ValueError, match="direction"):
            session.insert_message(message_id="x", direction="sideways", text="t", segments=[])
        with pytest.raises(ValueError, match="NUL"):
            session.insert_message(message_id="x", direction="in", text="t", segments=[], sender_nickname="a\x00")
    assert Scoped(a).messages.count() == 0
    for too_wide in (IsolationContext(a.tenant_id), IsolationContext(a.tenant_id, a.agent_id, "qq")):
        with isolation_db.unit_of_work(write=True), pytest.raises(IsolationViolationError):
            fastpath.ChatSession(too_wide)
    with pytest.raises(RuntimeError, match="inside a transaction"):
        fastpath.ChatSession(a).message_text("x")


def test_an_unconfigured_database_is_reported(streams):
    saved = isolation_db.database.obj
    isolation_db.database.initialize(None)
    try:
        with pytest.raises(RuntimeError, match="not configured"):
            fastpath.ChatSession(streams["a"])
    finally:
        isolation_db.database.initialize(saved)


def _exchange(session: fastpath.ChatSession, inbound_id: str, reply_id: str, text: str = "hi"):
    return session.store_exchange(
        content_hash="h-" + text,
        inbound={"message_id": inbound_id, "direction": "in", "text": text, "segments": [], "sender_user_id": "u1"},
        reply={
            "message_id": reply_id,
            "direction": "out",
            "text": "re: " + text,
            "segments": [],
            "reply_to": inbound_id,
        },
        usage={"provider": "offline", "model": "offline", "outcome": "offline", "latency_ms": 1},
    )


def test_an_exchange_stores_message_reply_and_usage_in_its_stream_only(streams):
    a, b = streams["a"], streams["b"]
    with isolation_db.unit_of_work(write=True):
        assert _exchange(fastpath.ChatSession(a), "m1", "mt-reply:m1") == (True, True)
        # The same ids in another tenant's stream are that stream's own rows.
        assert _exchange(fastpath.ChatSession(b), "m1", "mt-reply:m1", "b's") == (True, True)
    with isolation_db.unit_of_work(write=True):
        recent = fastpath.ChatSession(a).recent_messages(10)
    # The reply is younger than its message, so the history's order holds whatever the row ids.
    assert [(m["message_id"], m["direction"], m["text"]) for m in recent] == [
        ("m1", "in", "hi"),
        ("mt-reply:m1", "out", "re: hi"),
    ]
    stored = Scoped(a).messages.by_message_id("m1")
    assert (stored["tenant_id"], stored["chat_stream_id"], stored["content_hash"]) == (
        a.tenant_id, a.chat_stream_id, "h-hi",
    )  # fmt: skip
    assert [(u["provider"], u["chat_stream_id"]) for u in Scoped(a).llm_usage.list()] == [("offline", a.chat_stream_id)]
    assert Scoped(b).messages.by_message_id("m1")["text"] == "b's"
    assert len(Scoped(b).llm_usage.list()) == 1


def test_an_exchange_writes_nothing_when_the_message_id_is_taken_and_no_usage_when_the_reply_is(streams):
    a = streams["a"]
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(a)
        assert _exchange(session, "m1", "mt-reply:m1") == (True, True)
        # The message id is stored: nothing at all is written (the caller takes the general path).
        assert _exchange(session, "m1", "mt-reply:m1#other", "again") == (False, False)
        # The reply id is stored (answered elsewhere first): the message is, its reply and usage not.
        assert _exchange(session, "m2", "mt-reply:m1", "two") == (True, False)
    assert Scoped(a).messages.count() == 3
    assert Scoped(a).messages.by_message_id("mt-reply:m1")["text"] == "re: hi"
    with isolation_db.unit_of_work(write=True):
        assert fastpath.ChatSession(a).message_text("mt-reply:m1#other") is None
    assert len(Scoped(a).llm_usage.list()) == 1


def test_an_exchange_with_bad_input_writes_nothing(streams):
    a = streams["a"]
    with isolation_db.unit_of_work(write=True), pytest.raises(ValueError, match="NUL"):
        _exchange(fastpath.ChatSession(a), "m1", "mt-reply:m1", "bad\x00")
    assert Scoped(a).messages.count() == 0
    with pytest.raises(RuntimeError, match="inside a transaction"):
        _exchange(fastpath.ChatSession(a), "m1", "mt-reply:m1")
