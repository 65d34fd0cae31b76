"""maim_message's own clients (API-Server WebSocketClient and legacy Router) against the replier."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import httpx
import socketio
from maim_message import RouteConfig, Router, TargetConfig
from replier_support import MaimClient, api_message, legacy_message, make_tenant, run, wait_for

from isolation import Scoped
from isolation.ids import utcnow


def test_api_server_client_gets_a_stored_reply(replier_server):
    ta = make_tenant()

    async def scenario():
        client = await MaimClient(replier_server.url, ta.secret).start()
        try:
            await client.send(api_message("hello there", message_id="m-1", user_id="alice", nickname="Alice"))
            reply = await client.reply()
        finally:
            await client.stop()
        return reply

    reply = run(scenario())
    assert reply.message_info.message_id == "mt-reply:m-1"
    assert reply.message_info.platform == "qq"
    assert "hello there" in reply.message_segment.data
    meta = reply.message_info.additional_config["maitenant"]
    assert meta["offline"] is True and meta["provider"] == "offline"
    assert reply.message_segment.data.startswith("[offline]")
    history = ta.history("qq", user_id="alice")
    assert [(m["direction"], m["message_id"]) for m in history] == [("in", "m-1"), ("out", "mt-reply:m-1")]
    usage = Scoped(ta.stream_ctx("qq", user_id="alice")).llm_usage.list()
    assert [(u["provider"], u["outcome"]) for u in usage] == [("offline", "offline")]


def test_legacy_router_gets_a_bare_messagebase_reply(replier_server):
    ta = make_tenant()
    received: list[dict] = []

    async def scenario():
        router = Router(RouteConfig({"wechat": TargetConfig(url=replier_server.url, token=ta.secret)}))

        async def handler(message: dict):
            received.append(message)

        router.register_class_handler(handler)
        task = asyncio.create_task(router.run())
        try:
            await wait_for(lambda: router.check_connection("wechat"))
            await router.send_message(
                legacy_message("hi from legacy", message_id="L-1", platform="wechat", group_id="g9")
            )
            await wait_for(lambda: received)
        finally:
            await router.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    reply = received[0]
    assert "ver" not in reply  # a bare MessageBase, not an envelope
    assert reply["message_info"]["message_id"] == "mt-reply:L-1"
    assert reply["message_info"]["group_info"]["group_id"] == "g9"
    assert "hi from legacy" in reply["message_segment"]["data"]
    assert [m["direction"] for m in ta.history("wechat", group_id="g9")] == ["in", "out"]


def test_wrong_revoked_and_expired_keys_are_refused_with_a_reason(replier_server):
    ta = make_tenant()
    revoked_id, revoked = ta.new_key()
    ta.revoke(revoked_id)
    _, expired = ta.new_key(expires_at=utcnow() - timedelta(minutes=1))

    async def scenario():
        reasons = {}
        for label, key in (("wrong", "mtk_not-a-key"), ("revoked", revoked), ("expired", expired)):
            client = MaimClient(replier_server.url, key)
            try:
                reasons[label] = await client.refused()
            finally:
                await client.stop()
        return reasons

    reasons = run(scenario())
    assert "invalid api key" in reasons["wrong"]
    assert "api key revoked" in reasons["revoked"]
    assert "api key expired" in reasons["expired"]


def test_revoked_key_closes_the_live_connection(replier_server):
    ta = make_tenant()

    async def scenario():
        client = await MaimClient(replier_server.url, ta.secret).start()
        try:
            await client.send(api_message("before revoke"))
            await client.reply()
            ta.revoke()
            told = await client.error(timeout=10)  # told why before the close (issue 14)
            await wait_for(lambda: not client.client.is_connected(), timeout=10)
        finally:
            await client.stop()
        return told

    told = run(scenario())
    assert told["code"] == "key_revoked" and "revoked" in told["message"], told


def _envelope(msg_id, payload, msg_type="sys_std"):
    return {"ver": 1, "msg_id": msg_id, "type": msg_type, "meta": {}, "payload": payload}


async def raw_client(url_http: str, key: str, platform: str = "qq", **headers):
    """A plain python-socketio client speaking the API-Server envelope; returns (client, queue)."""
    inbox: asyncio.Queue = asyncio.Queue()
    sio = socketio.AsyncClient(reconnection=False)

    @sio.on("message")
    async def on_message(data):
        await inbox.put(data)

    await sio.connect(
        url_http,
        socketio_path="ws",
        transports=["websocket"],
        headers={"x-apikey": key, "x-platform": platform, **headers},
        wait_timeout=10,
    )
    return sio, inbox


async def next_of(inbox: asyncio.Queue, msg_type: str, timeout: float = 10.0) -> dict:
    while True:
        data = await asyncio.wait_for(inbox.get(), timeout)
        if data.get("type") == msg_type:
            return data


def test_acks_dedup_and_server_generated_connection_ids(replier_server):
    ta = make_tenant()
    payload = api_message("count me once", message_id="dup-1").to_dict()

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret, **{"x-uuid": "client-chosen-id"})
        try:
            await sio.emit("message", _envelope("env-1", payload))
            ack = await asyncio.wait_for(inbox.get(), 10)
            assert ack["type"] == "sys_ack" and ack["meta"]["acked_msg_id"] == "env-1"
            assert ack["meta"]["uuid"] != "client-chosen-id" and ack["meta"]["uuid"].startswith("conn_")
            first = await next_of(inbox, "sys_std")
            assert first["payload"]["message_info"]["message_id"] == "mt-reply:dup-1"
            assert first["payload"]["message_dim"]["platform"] == "qq"
            assert isinstance(first["payload"]["message_info"]["time"], float)
            # The same envelope again: acked again, not processed again.
            await sio.emit("message", _envelope("env-1", payload))
            again = await asyncio.wait_for(inbox.get(), 10)
            assert again["type"] == "sys_ack" and again["meta"]["acked_msg_id"] == "env-1"
            # An ack is never acked: the next thing we get is the ack of the following message.
            await sio.emit("message", _envelope("ack-1", {"status": "received"}, "sys_ack"))
            await sio.emit("message", _envelope("env-2", api_message("second", message_id="m-2").to_dict()))
            nxt = await asyncio.wait_for(inbox.get(), 10)
            assert nxt["type"] == "sys_ack" and nxt["meta"]["acked_msg_id"] == "env-2"
            second = await next_of(inbox, "sys_std")
            assert second["payload"]["message_info"]["message_id"] == "mt-reply:m-2"
            # Same message id in a new envelope (a replay after reconnect): the stored reply, no new rows.
            await sio.emit("message", _envelope("env-3", payload))
            replay = await next_of(inbox, "sys_std")
            assert replay["payload"]["message_info"]["message_id"] == "mt-reply:dup-1"
            assert replay["meta"]["maitenant"]["replayed"] is True
        finally:
            await sio.disconnect()

    run(scenario())
    history = ta.history("qq", user_id="user-1")
    assert [m["message_id"] for m in history] == ["dup-1", "mt-reply:dup-1", "m-2", "mt-reply:m-2"]


def test_health_and_metrics(replier_server):
    health = httpx.get(f"{replier_server.http}/health").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    text = httpx.get(f"{replier_server.http}/metrics").text
    for name in (
        "replier_connections",
        "replier_messages_in_total",
        "replier_messages_out_total",
        "replier_reply_latency_seconds_bucket",
        "replier_llm_errors",
    ):
        assert name in text
    assert httpx.get(f"{replier_server.http}/nope").status_code == 404


def test_agent_updates_are_seen_and_disabled_agents_refuse(replier_server):
    ta = make_tenant(persona={"personality": "calm"})

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret)
        try:
            await sio.emit("message", _envelope("u-1", api_message("one", message_id="u-1").to_dict()))
            first = await next_of(inbox, "sys_std")
            Scoped(ta.ctx).agents.update(ta.agent_id, persona={"personality": "grumpy"})
            await sio.emit("message", _envelope("u-2", api_message("two", message_id="u-2").to_dict()))
            second = await next_of(inbox, "sys_std")
            Scoped(ta.ctx).agents.update(ta.agent_id, status="disabled")
            await sio.emit("message", _envelope("u-3", api_message("three", message_id="u-3").to_dict()))
            error = await next_of(inbox, "custom_error")
            return first, second, error
        finally:
            await sio.disconnect()

    first, second, error = run(scenario())
    assert "calm" in first["payload"]["message_segment"]["data"]
    assert "grumpy" in second["payload"]["message_segment"]["data"]
    assert error["payload"]["code"] == "agent_disabled"


def test_connections_beyond_the_maximum_are_refused(provisioned, configured_db):
    from replier_support import ReplierProcess

    ta = make_tenant()
    server = ReplierProcess(provisioned.url, provisioned.app_role, MAX_CONNECTIONS="1").start()

    async def scenario():
        first, _ = await raw_client(server.http, ta.secret)
        try:
            second = socketio.AsyncClient(reconnection=False)
            reasons = []

            @second.event
            async def connect_error(data):
                reasons.append(data)

            with contextlib.suppress(socketio.exceptions.ConnectionError):
                await second.connect(
                    server.http, socketio_path="ws", transports=["websocket"], headers={"x-apikey": ta.secret}
                )
            await wait_for(lambda: reasons)
            return reasons[0]
        finally:
            await first.disconnect()

    try:
        reason = run(scenario())
    finally:
        server.stop()
    assert "server full" in reason["message"]
