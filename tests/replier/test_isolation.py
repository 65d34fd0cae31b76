"""Tenants sharing platform, group and user ids never share streams, history, memory or replies."""

from __future__ import annotations

import asyncio

from replier_support import MaimClient, api_message, make_tenant, run
from test_compat import _envelope, next_of, raw_client

from isolation import Scoped


def test_same_platform_group_and_user_stay_separate_per_tenant(replier_server):
    a, b = make_tenant(), make_tenant()

    async def scenario():
        ca = await MaimClient(replier_server.url, a.secret).start()
        cb = await MaimClient(replier_server.url, b.secret).start()
        try:
            await ca.send(api_message("my name is Alice", message_id="same-1", group_id="42", user_id="u7"))
            ra = await ca.reply()
            await cb.send(api_message("who am I?", message_id="same-1", group_id="42", user_id="u7"))
            rb = await cb.reply()
            await ca.send(api_message("second from A", message_id="same-2", group_id="42", user_id="u7"))
            ra2 = await ca.reply()
            # Each client got exactly its own replies.
            assert ca.replies.empty() and cb.replies.empty()
            return ra, rb, ra2
        finally:
            await asyncio.gather(ca.stop(), cb.stop())

    ra, rb, ra2 = run(scenario())
    assert "my name is Alice" in ra.message_segment.data
    assert "who am I?" in rb.message_segment.data
    assert "Alice" not in rb.message_segment.data  # B never sees A's memory
    assert ra2.message_segment.data.startswith("[offline] Alice,")  # A's own memory is used
    sa = ra.message_info.additional_config["maitenant"]["chat_stream_id"]
    sb = rb.message_info.additional_config["maitenant"]["chat_stream_id"]
    assert sa != sb
    hist_a = a.history("qq", group_id="42")
    hist_b = b.history("qq", group_id="42")
    assert [m["text"] for m in hist_a if m["direction"] == "in"] == ["my name is Alice", "second from A"]
    assert [m["text"] for m in hist_b if m["direction"] == "in"] == ["who am I?"]
    mem_a = [m["content"] for m in Scoped(a.stream_ctx("qq", group_id="42")).memories.relevant()]
    mem_b = [m["content"] for m in Scoped(b.stream_ctx("qq", group_id="42")).memories.relevant()]
    assert any("Alice" in m for m in mem_a)
    assert mem_b == []


def test_message_dim_and_x_uuid_cannot_reach_another_tenant(replier_server):
    victim, attacker = make_tenant(), make_tenant()

    async def scenario():
        vsio, vinbox = await raw_client(replier_server.http, victim.secret, **{"x-uuid": "shared-uuid"})
        asio, ainbox = await raw_client(replier_server.http, attacker.secret, **{"x-uuid": "shared-uuid"})
        try:
            # The attacker writes the victim's key into message_dim and reuses the victim's x-uuid.
            forged = api_message("forged", message_id="f-1", group_id="42", dim_key=victim.secret).to_dict()
            await asio.emit("message", _envelope("a-1", forged))
            attacker_reply = await next_of(ainbox, "sys_std")
            # The victim then talks in the same group; its first reply must be its own.
            await vsio.emit("message", _envelope("v-1", api_message("mine", message_id="v-1", group_id="42").to_dict()))
            victim_reply = await next_of(vinbox, "sys_std")
            assert victim_reply["payload"]["message_info"]["message_id"] == "mt-reply:v-1"
            return attacker_reply, victim_reply
        finally:
            await asyncio.gather(vsio.disconnect(), asio.disconnect())

    attacker_reply, _victim_reply = run(scenario())
    assert attacker_reply["payload"]["message_dim"]["api_key"] == attacker.secret
    assert [m["message_id"] for m in attacker.history("qq", group_id="42")] == ["f-1", "mt-reply:f-1"]
    assert [m["message_id"] for m in victim.history("qq", group_id="42")] == ["v-1", "mt-reply:v-1"]
