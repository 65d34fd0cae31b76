"""`isolation.fastpath` (the replier's precompiled hot-path statements) keeps the scoping rules."""

from __future__ import annotations

import pytest
from replier_support import make_tenant

from isolation import IsolationContext, Scoped, fastpath
from isolation import db as isolation_db
from isolation.errors import IsolationViolationError


def _stream(ta, user_id):
    ctx = ta.stream_ctx("qq", user_id=user_id)
    Scoped(ctx).chat_streams.get_or_create(user_id=user_id)
    return ctx


def test_fastpath_is_scoped_idempotent_and_transactional(configured_db):
    a, b = make_tenant(), make_tenant()
    a_ctx, a_other = _stream(a, "u1"), _stream(a, "u2")
    b_ctx = _stream(b, "u1")
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(a_ctx)
        assert session.insert_message(message_id="m1", direction="in", text="hello", segments={"type": "text"})
        assert not session.insert_message(message_id="m1", direction="in", text="again", segments={})
        session.insert_message(message_id="m2", direction="out", text="hi", segments={}, sender_nickname="bot")
        session.record_usage(provider="offline", model="offline", outcome="offline")
    Scoped(a_other).memories.add("other chat only", level="chat", source="test")
    Scoped(a_ctx).memories.add("this chat", level="chat", source="test")
    Scoped(a.ctx).memories.add("agent wide", level="agent", source="test")
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(a_ctx)
        assert [m["message_id"] for m in session.recent_messages(10)] == ["m1", "m2"]
        assert [m["text"] for m in session.recent_messages(1)] == ["hi"]
        assert session.message_text("m1") == "hello"
        assert sorted(session.relevant_memories(10)) == ["agent wide", "this chat"]
        # Tenant B's identical platform/user and a forged context naming A's stream see nothing of A.
        assert fastpath.ChatSession(b_ctx).recent_messages(10) == []
        forged = IsolationContext(b.tenant_id, b.agent_id, "qq", a_ctx.chat_stream_id)
        assert fastpath.ChatSession(forged).recent_messages(10) == []
        assert fastpath.ChatSession(forged).message_text("m1") is None
        assert fastpath.ChatSession(b_ctx).relevant_memories(10) == []
    with isolation_db.unit_of_work(write=True):
        fastpath.ChatSession(a_ctx).insert_reply_with_usage(
            {"message_id": "m3", "direction": "out", "text": "bye", "segments": {}},
            {"provider": "openai", "model": "m", "outcome": "error", "error": "HTTP 500"},
        )
    assert Scoped(a_ctx).messages.by_message_id("m3")["text"] == "bye"
    usage = Scoped(a_ctx).llm_usage.list()
    assert sorted(u["outcome"] for u in usage) == ["error", "offline"]
    assert [u["error"] for u in usage if u["outcome"] == "error"] == ["HTTP 500"]
    assert Scoped(b.ctx).messages.count() == 0
    with pytest.raises(IsolationViolationError):
        fastpath.ChatSession(IsolationContext(a.tenant_id, a.agent_id, "qq"))
    with pytest.raises(RuntimeError):
        fastpath.ChatSession(a_ctx).recent_messages(5)  # outside a transaction
    with isolation_db.unit_of_work(write=True), pytest.raises(ValueError):
        fastpath.ChatSession(a_ctx).insert_message(message_id="nul", direction="in", text="a\x00b", segments={})
