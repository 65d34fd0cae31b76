"""Where a reply goes and how often a message is answered, against the real replier subprocess.

- No fan-out: a reply goes to the connection that sent the message; if it is gone, to exactly one
  other connection of the stream.
- Exactly once, decided by the database: an answer stored first (by another process, a recovery pass)
  stands; the late answer is not stored, its usage is not counted, and the stored one is sent.
"""

from __future__ import annotations

import asyncio

from replier_support import MaimClient, api_message, make_tenant, run, wait_for

from isolation import Scoped


def _llm(fake_llm, model: str) -> dict:
    return {"provider": "openai", "base_url": fake_llm.base_url, "model": model, "timeout_seconds": 10}


async def _quiet(client: MaimClient, seconds: float = 0.6) -> None:
    """Nothing more arrives at `client` within `seconds` (after the replies we waited for)."""
    await asyncio.sleep(seconds)
    assert client.replies.empty(), "a reply reached a connection it was not meant for"


def test_each_connection_gets_only_replies_to_its_own_messages(replier_server, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-delay"), llm_key="sk-test")

    async def scenario():
        a = await MaimClient(replier_server.url, ta.secret).start()
        b = await MaimClient(replier_server.url, ta.secret).start()
        c = await MaimClient(replier_server.url, ta.secret).start()
        try:
            # All three speak in group g (each is subscribed to its stream).
            for name, client in (("a", a), ("b", b), ("c", c)):
                await client.send(api_message(f"hello from {name}", message_id=f"fo-{name}", group_id="g"))
            for name, client in (("a", a), ("b", b), ("c", c)):
                reply = await client.reply()
                assert reply.message_info.message_id == f"mt-reply:fo-{name}"
            for client in (a, b, c):
                await _quiet(client, 0.2)
            # The sender leaves while its answer is being made: exactly one other connection gets it.
            await a.send(api_message("answer me after I left", message_id="fo-gone", group_id="g"))
            await wait_for(lambda: any("after I left" in str(r["messages"]) for r in fake_llm.requests))
            await a.stop()
            got = await wait_for(lambda: not b.replies.empty() or not c.replies.empty(), timeout=10)
            assert got
            await asyncio.sleep(0.6)
            receivers = [client for client in (b, c) if not client.replies.empty()]
            assert len(receivers) == 1, "the reply of a departed sender went to several connections"
            message = await receivers[0].reply()
            assert message.message_info.message_id == "mt-reply:fo-gone"
        finally:
            for client in (b, c):
                await client.stop()

    run(scenario())


def test_an_answer_stored_first_elsewhere_stands(replier_server, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-delay"), llm_key="sk-test")
    stream = ta.stream_ctx("qq", user_id="race-user")

    async def scenario():
        client = await MaimClient(replier_server.url, ta.secret).start()
        try:
            await client.send(api_message("who answers first?", message_id="race-1", user_id="race-user"))
            # While the model is thinking, "another process" stores its answer to the same message.
            await wait_for(lambda: any("who answers first" in str(r["messages"]) for r in fake_llm.requests))
            Scoped(stream).messages.add(
                message_id="mt-reply:race-1", direction="out", text="the first answer", segments={}
            )
            reply = await client.reply()
            await _quiet(client, 0.3)
            return reply
        finally:
            await client.stop()

    reply = run(scenario())
    assert reply.message_segment.data == "the first answer"
    assert reply.message_info.additional_config["maitenant"]["replayed"] is True
    rows = [m for m in ta.history("qq", user_id="race-user") if m["direction"] == "out"]
    assert [(m["message_id"], m["text"]) for m in rows] == [("mt-reply:race-1", "the first answer")]
    # The late answer's usage row was not recorded (it was not stored).
    assert Scoped(ta.ctx).llm_usage.list() == []


def test_one_message_id_sent_through_two_connections_at_once_is_stored_and_answered_once(replier_server, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-delay"), llm_key="sk-test")

    async def scenario():
        a = await MaimClient(replier_server.url, ta.secret).start()
        b = await MaimClient(replier_server.url, ta.secret).start()
        try:
            message = api_message("said twice", message_id="twice-1", user_id="twin")
            await asyncio.gather(a.send(message), b.send(message))
            return await a.reply(), await b.reply()
        finally:
            await a.stop()
            await b.stop()

    first, second = run(scenario())
    assert first.message_info.message_id == second.message_info.message_id == "mt-reply:twice-1"
    assert first.message_segment.data == second.message_segment.data
    flags = sorted(bool(m.message_info.additional_config["maitenant"].get("replayed")) for m in (first, second))
    assert flags == [False, True]  # one answer made, one replay of it
    ids = [m["message_id"] for m in ta.history("qq", user_id="twin")]
    assert ids == ["twice-1", "mt-reply:twice-1"]
    assert len(Scoped(ta.ctx).llm_usage.list()) == 1


def test_maim_client_reused_id_new_text_is_answered_and_identical_resend_replayed(replier_server):
    ta = make_tenant()

    async def scenario():
        client = await MaimClient(replier_server.url, ta.secret).start()
        try:
            got = []
            for text in ("test message", "another text", "test message"):
                await client.send(api_message(text, message_id="test_msg_001", user_id="reuser"))
                got.append(await client.reply())
            return got
        finally:
            await client.stop()

    first, other, again = run(scenario())
    assert first.message_info.message_id == "mt-reply:test_msg_001"
    assert other.message_info.message_id.startswith("mt-reply:test_msg_001#")
    assert other.message_info.additional_config["maitenant"]["reply_to"] == "test_msg_001"
    assert again.message_info.message_id == "mt-reply:test_msg_001"
    assert again.message_info.additional_config["maitenant"]["replayed"] is True
    inbound = [m["text"] for m in ta.history("qq", user_id="reuser") if m["direction"] == "in"]
    assert inbound == ["test message", "another text"]
