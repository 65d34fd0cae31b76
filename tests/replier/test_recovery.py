"""Crash recovery against the real replier subprocess and maim_message's own `WebSocketClient`.

- kill -9 while LLM calls are in flight, then restart: every message the client got an ack for is
  answered exactly once (one reply row per inbound row), and the client, which reconnects by itself,
  receives each answer, without sending anything again.
- Replies stored but never delivered (the sender left, no other connection) are delivered when a
  connection of the agent comes back, once.
"""

from __future__ import annotations

import asyncio
import re

from replier_support import MaimClient, ReplierProcess, api_message, make_tenant, run, wait_for

from isolation import Scoped

ACK_LINE = re.compile(r"acked_msg_id=(\S+)")


def _llm(fake_llm, model: str) -> dict:
    return {"provider": "openai", "base_url": fake_llm.base_url, "model": model, "timeout_seconds": 20}


def _acks(client: MaimClient) -> set[str]:
    """The envelope ids the maim client logged as acknowledged (its own DEBUG line per sys_ack)."""
    return {m.group(1) for line in client.log.lines if (m := ACK_LINE.search(line))}


def test_kill9_during_slow_llm_calls_every_acked_message_is_answered_once(provisioned, configured_db, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-sleep-3"), llm_key="sk-test")
    server = ReplierProcess(
        provisioned.url,
        provisioned.app_role,
        RECOVERY_GRACE_SECONDS="0.5",
        RECOVERY_INTERVAL_SECONDS="1",
        LLM_MEMORY_EXTRACTION="false",
    ).start()
    # Six streams (LLM calls in flight concurrently) and a busy one with three queued messages.
    messages = [api_message(f"question {i}", message_id=f"k-{i}", user_id=f"kill-user-{i}") for i in range(6)]
    messages += [api_message(f"queued {i}", message_id=f"q-{i}", user_id="kill-queue") for i in range(3)]
    sent_ids = {m.message_info.message_id for m in messages}

    async def scenario():
        client = await MaimClient(server.url, ta.secret).start()
        try:
            for message in messages:
                await client.send(message)
            await wait_for(lambda: len(_acks(client)) == len(messages), timeout=15)
            acked = len(_acks(client))
            await wait_for(lambda: len(fake_llm.requests) and any("question 5" in str(r) for r in fake_llm.requests))
            server.kill9()  # the LLM calls take 3 s: none is answered yet
            assert client.replies.empty()
            await wait_for(lambda: not client.client.is_connected())
            server.start()
            await wait_for(lambda: client.client.is_connected(), timeout=20)
            replies = []
            while len(replies) < len(messages):
                replies.append(await client.reply(timeout=30))
            await asyncio.sleep(1.5)  # nothing more comes (no second answer, no redelivery)
            assert client.replies.empty()
            return acked, replies
        finally:
            await client.stop()

    try:
        acked, replies = run(scenario())
    finally:
        server.stop()
    assert acked == len(messages)
    reply_ids = sorted(r.message_info.message_id for r in replies)
    assert reply_ids == sorted(f"mt-reply:{i}" for i in sent_ids)
    for user in [f"kill-user-{i}" for i in range(6)] + ["kill-queue"]:
        rows = ta.history("qq", user_id=user)
        inbound = [m["message_id"] for m in rows if m["direction"] == "in"]
        out = [m["message_id"] for m in rows if m["direction"] == "out"]
        assert sorted(out) == sorted(f"mt-reply:{i}" for i in inbound), user
        assert all(m["delivered_at"] is not None for m in rows if m["direction"] == "out")
    # In order within the busy stream.
    queue_replies = [r.message_info.message_id for r in replies if r.message_info.message_id.startswith("mt-reply:q-")]
    assert queue_replies == ["mt-reply:q-0", "mt-reply:q-1", "mt-reply:q-2"]


def test_undelivered_replies_reach_the_next_connection_of_the_agent_once(replier_server, fake_llm):
    ta = make_tenant(llm=_llm(fake_llm, "fake-delay"), llm_key="sk-test")
    # A reply stored before a crash, never sent.
    stream = ta.stream_ctx("qq", group_id="crash-group")
    Scoped(ta.ctx.child(platform="qq")).chat_streams.get_or_create(group_id="crash-group")
    Scoped(stream).messages.add(
        message_id="before-crash", direction="in", text="hi", segments={}, sender_user_id="member-1"
    )
    Scoped(stream).messages.add(
        message_id="mt-reply:before-crash",
        direction="out",
        text="stored, never sent",
        segments={},
        reply_to="before-crash",
        sender_nickname="bot",
    )

    async def scenario():
        leaver = await MaimClient(replier_server.url, ta.secret).start()
        on_connect = await leaver.reply()  # the first connection of the agent gets the stored reply
        await leaver.send(api_message("answer me later", message_id="left-1", user_id="leaver"))
        await wait_for(lambda: any("answer me later" in str(r) for r in fake_llm.requests))
        await leaver.stop()  # gone before its answer: nobody else is connected
        stored = ta.stream_ctx("qq", user_id="leaver")
        await wait_for(lambda: any(m["message_id"] == "mt-reply:left-1" for m in Scoped(stored).messages.history(10)))
        back = await MaimClient(replier_server.url, ta.secret).start()
        try:
            later = await back.reply()
            await asyncio.sleep(0.5)
            assert back.replies.empty()
        finally:
            await back.stop()
        again = await MaimClient(replier_server.url, ta.secret).start()
        try:
            await asyncio.sleep(1.0)
            assert again.replies.empty(), "a delivered reply was delivered again"
        finally:
            await again.stop()
        return on_connect, later

    crash, later = run(scenario())
    assert crash.message_info.message_id == "mt-reply:before-crash"
    assert crash.message_segment.data == "stored, never sent"
    assert crash.message_info.receiver_info.group_info.group_id == "crash-group"
    meta = crash.message_info.additional_config["maitenant"]
    assert meta["redelivered"] is True and meta["replayed"] is True
    assert later.message_info.message_id == "mt-reply:left-1"
    assert later.message_info.receiver_info.user_info.user_id == "leaver"
    for rows in (ta.history("qq", group_id="crash-group"), ta.history("qq", user_id="leaver")):
        assert all(m["delivered_at"] is not None for m in rows if m["direction"] == "out")
