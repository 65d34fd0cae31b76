"""Wire-level edge paths against the real `python -m replier` subprocess (plain python-socketio clients)."""

from __future__ import annotations

import asyncio

import socketio
from replier_support import api_message, legacy_message, make_tenant, run, wait_for
from test_compat import _envelope, next_of, raw_client


async def _legacy_client(http: str, headers: dict) -> tuple[socketio.AsyncClient, list]:
    received: list = []
    sio = socketio.AsyncClient(reconnection=False)

    @sio.on("message")
    async def on_message(data):
        received.append(data)

    await sio.connect(http, socketio_path="ws", transports=["websocket"], headers=headers, wait_timeout=10)
    return sio, received


def test_legacy_bearer_token_connects_and_a_revoked_key_closes_it(replier_server):
    ta = make_tenant()

    async def scenario():
        sio, received = await _legacy_client(
            replier_server.http, {"Authorization": f"Bearer {ta.secret}", "platform": "wechat"}
        )
        try:
            await sio.emit("message", legacy_message("via bearer", message_id="B-1", platform="wechat").to_dict())
            await wait_for(lambda: received)
            await sio.emit("message", "not a MessageBase")
            await wait_for(lambda: len(received) >= 2)
            ta.revoke()
            await wait_for(lambda: not sio.connected)
        finally:
            if sio.connected:
                await sio.disconnect()
        return received

    reply, error, closing = run(scenario())
    # Before the close, the legacy client is told why (issue 14: it used to be closed without a word).
    assert closing["message_info"]["additional_config"]["maitenant"]["error"]["code"] == "key_revoked"
    assert closing["message_segment"]["data"].startswith("[error key_revoked]")
    assert reply["message_info"]["message_id"] == "mt-reply:B-1"
    assert "via bearer" in reply["message_segment"]["data"]
    info = error["message_info"]
    assert info["platform"] == "wechat"  # the connection's platform header
    assert info["additional_config"]["maitenant"]["error"] == {
        "code": "invalid_message",
        "message": "expected a MessageBase object {message_info, message_segment}",
        "message_id": None,
    }
    assert "ver" not in error  # legacy clients get a bare MessageBase, never a custom_error envelope


def test_an_envelope_without_msg_id_is_answered_without_an_ack(replier_server):
    ta = make_tenant()
    payload = api_message("no envelope id", message_id="noid-1", user_id="u-noid").to_dict()

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret)
        try:
            await sio.emit("message", {"ver": 1, "type": "sys_std", "meta": {}, "payload": payload})
            first = await asyncio.wait_for(inbox.get(), 10)
        finally:
            await sio.disconnect()
        return first

    first = run(scenario())
    assert first["type"] == "sys_std"  # the reply comes first: no sys_ack for an envelope without id
    assert first["payload"]["message_info"]["message_id"] == "mt-reply:noid-1"
    assert [m["message_id"] for m in ta.history("qq", user_id="u-noid")] == ["noid-1", "mt-reply:noid-1"]


def test_binary_attachments_count_towards_the_payload_limit(replier_server):
    """A Socket.IO binary event used to bypass the 64 KiB check (its size was counted as 0)."""
    ta = make_tenant()
    payload = api_message("with a blob", message_id="bin-1", user_id="u-bin").to_dict()
    payload["message_info"]["additional_config"] = {"blob": b"y" * 70_000}

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret)
        try:
            await sio.emit("message", _envelope("bin-env", payload))
            return await next_of(inbox, "custom_error")
        finally:
            await sio.disconnect()

    error = run(scenario())
    assert error["payload"]["code"] == "payload_too_large"
    assert error["payload"]["message_id"] == "bin-1"
    assert ta.history("qq", user_id="u-bin") == []
