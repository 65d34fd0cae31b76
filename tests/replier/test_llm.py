"""The openai provider against a local OpenAI-compatible test double (tests/replier/fake_openai.py)."""

from __future__ import annotations

import signal

from replier_support import MaimClient, ReplierProcess, api_message, make_tenant, run, wait_for

from isolation import Scoped
from replier.answer import FALLBACK_REPLY


def _llm(fake_llm, model: str, timeout: float = 5.0) -> dict:
    return {"provider": "openai", "base_url": fake_llm.base_url, "model": model, "timeout_seconds": timeout}


def test_prompt_carries_persona_memories_and_history(replier_server, fake_llm):
    ta = make_tenant(
        persona={"personality": "a pirate who loves tea", "interests": ["sailing"]},
        llm=_llm(fake_llm, "fake-echo"),
        llm_key="sk-test-agent-key",
    )
    Scoped(ta.ctx).memories.add("The user prefers short answers", level="agent", source="test")

    async def scenario():
        client = await MaimClient(replier_server.url, ta.secret).start()
        try:
            replies = []
            for i, text in enumerate(["first message", "my name is Zed", "third message"]):
                await client.send(api_message(text, message_id=f"llm-{i}", user_id="zed-user", nickname="Z"))
                replies.append(await client.reply())
            return replies
        finally:
            await client.stop()

    replies = run(scenario())
    assert replies[0].message_segment.data == "LLM reply to: Z: first message"
    meta = replies[2].message_info.additional_config["maitenant"]
    assert meta["offline"] is False and meta["provider"] == "openai" and meta["outcome"] == "ok"
    chats = [
        r
        for r in fake_llm.requests
        if r["model"] == "fake-echo"
        and "third message" in r["messages"][-1]["content"]
        and "extract one short fact" not in r["messages"][0]["content"]
    ]
    assert len(chats) == 1
    messages = chats[0]["messages"]
    system = messages[0]["content"]
    assert "a pirate who loves tea" in system and "sailing" in system
    assert "The user prefers short answers" in system
    assert "The user's name is Zed" in system  # extracted by the model after the second message
    roles_texts = [(m["role"], m["content"]) for m in messages[1:]]
    assert roles_texts == [
        ("user", "Z: first message"),
        ("assistant", "LLM reply to: Z: first message"),
        ("user", "Z: my name is Zed"),
        ("assistant", "LLM reply to: Z: my name is Zed"),
        ("user", "Z: third message"),
    ]
    usage = Scoped(ta.stream_ctx("qq", user_id="zed-user")).llm_usage.list()
    assert [(u["provider"], u["outcome"], u["prompt_tokens"]) for u in usage] == [("openai", "ok", 11)] * 3


def test_server_errors_and_timeouts_give_the_fallback_and_an_error_row(replier_server, fake_llm):
    failing = make_tenant(llm=_llm(fake_llm, "fake-500"))
    slow = make_tenant(llm=_llm(fake_llm, "fake-slow", timeout=0.3))

    async def scenario():
        out = {}
        for label, ta in (("500", failing), ("slow", slow)):
            client = await MaimClient(replier_server.url, ta.secret).start()
            try:
                await client.send(api_message("are you there?", message_id=f"f-{label}", user_id="u"))
                out[label] = await client.reply(timeout=15)
            finally:
                await client.stop()
        return out

    replies = run(scenario())
    for label, ta, expected in (("500", failing, "HTTP 500"), ("slow", slow, "timeout")):
        reply = replies[label]
        assert reply.message_segment.data == FALLBACK_REPLY
        meta = reply.message_info.additional_config["maitenant"]
        assert meta["outcome"] == "error" and meta["error"] == "llm_unavailable"
        usage = Scoped(ta.stream_ctx("qq", user_id="u")).llm_usage.list()
        assert len(usage) == 1 and usage[0]["outcome"] == "error"
        assert expected in usage[0]["error"]
        history = ta.history("qq", user_id="u")
        assert [m["text"] for m in history] == ["are you there?", FALLBACK_REPLY]


def test_graceful_shutdown_finishes_in_flight_replies(provisioned, configured_db, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-delay"))
    server = ReplierProcess(provisioned.url, provisioned.app_role).start()
    seen_before = len(fake_llm.requests)

    async def scenario():
        client = await MaimClient(server.url, ta.secret).start()
        try:
            await client.send(api_message("slow one", message_id="g-1", user_id="u"))
            await wait_for(lambda: len(fake_llm.requests) > seen_before)  # the LLM call is in flight
            server.proc.send_signal(signal.SIGTERM)
            return await client.reply(timeout=10)
        finally:
            await client.stop()

    try:
        reply = run(scenario())
        assert reply.message_segment.data == "LLM reply to: u: slow one"
        server.proc.wait(15)
        assert "replier stopped" in server.logs()
    finally:
        server.stop()
    assert [m["direction"] for m in ta.history("qq", user_id="u")] == ["in", "out"]
