"""Bad input gets an error to that client; the connection keeps working and nothing is stored."""

from __future__ import annotations

import asyncio

import pytest
from maim_message.message import Seg
from replier_support import api_message, legacy_message, make_tenant, run, wait_for
from test_compat import _envelope, next_of, raw_client

from isolation import Scoped


def _payload(**changes):
    data = api_message("ok", message_id="bad-1", user_id="u-bad").to_dict()
    for path, value in changes.items():
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return data


_DELETE = object()

BAD = [
    ("not an object", "just a string", "invalid_envelope"),
    ("no type", {"ver": 1, "msg_id": "x1", "payload": {}}, "invalid_envelope"),
    ("unknown type", _envelope("x2", {}, "sys_weird"), "invalid_envelope"),
    ("payload missing", {"ver": 1, "msg_id": "x3", "type": "sys_std"}, "invalid_payload"),
    ("no message_info", _envelope("x4", _payload(message_info=_DELETE)), "missing_field"),
    ("no message id", _envelope("x5", _payload(**{"message_info.message_id": _DELETE})), "invalid_payload"),
    ("no time", _envelope("x6", _payload(**{"message_info.time": _DELETE})), "invalid_payload"),
    ("bad time", _envelope("x7", _payload(**{"message_info.time": "yesterday"})), "invalid_field"),
    ("no sender", _envelope("x8", _payload(**{"message_info.sender_info": _DELETE})), "missing_field"),
    ("bad platform", _envelope("x9", _payload(**{"message_info.platform": "q q"})), "invalid_field"),
    ("reserved id", _envelope("x10", _payload(**{"message_info.message_id": "mt-reply:zz"})), "invalid_field"),
    (
        "oversized text",
        _envelope("x11", _payload(message_segment={"type": "text", "data": "x" * (16 * 1024 + 1)})),
        "text_too_long",
    ),
    (
        "unknown segment",
        _envelope("x12", _payload(message_segment={"type": "hologram", "data": "?"})),
        "unknown_segment_type",
    ),
    ("empty text", _envelope("x13", _payload(message_segment={"type": "text", "data": "   "})), "empty_message"),
    (
        "payload too large",
        _envelope("x14", _payload(**{"message_info.additional_config": {"blob": "y" * 70_000}})),
        "payload_too_large",
    ),
    ("custom type", _envelope("x15", {"a": 1}, "custom_thing"), "unsupported_type"),
]


@pytest.fixture(scope="module")
def tenant(configured_db):
    return make_tenant()


def test_bad_api_input_gets_errors_and_the_connection_keeps_working(replier_server, tenant):
    async def scenario():
        sio, inbox = await raw_client(replier_server.http, tenant.secret)
        codes = {}
        try:
            for label, data, _code in BAD:
                await sio.emit("message", data)
                error = await next_of(inbox, "custom_error")
                codes[label] = error["payload"]["code"]
            await sio.emit(
                "message",
                _envelope("good-1", api_message("still here", message_id="good-1", user_id="u-bad").to_dict()),
            )
            reply = await next_of(inbox, "sys_std")
            assert reply["payload"]["message_info"]["message_id"] == "mt-reply:good-1"
        finally:
            await sio.disconnect()
        return codes

    codes = run(scenario())
    assert codes == {label: code for label, _, code in BAD}
    history = tenant.history("qq", user_id="u-bad")
    assert [m["message_id"] for m in history] == ["good-1", "mt-reply:good-1"]
    assert Scoped(tenant.ctx).chat_streams.count() == 1


def test_nested_segments_are_accepted_and_flattened(replier_server, tenant):
    async def scenario():
        sio, inbox = await raw_client(replier_server.http, tenant.secret)
        try:
            seg = Seg("seglist", [Seg("text", "look "), Seg("at", "bob"), Seg("image", "aGk=")])
            message = api_message(None, message_id="nest-1", user_id="u-nest", segment=seg)
            await sio.emit("message", _envelope("n-1", message.to_dict()))
            return await next_of(inbox, "sys_std")
        finally:
            await sio.disconnect()

    run(scenario())
    history = tenant.history("qq", user_id="u-nest")
    assert history[0]["text"] == "look @bob[image]"
    assert history[0]["segments"]["type"] == "seglist"


def test_bad_legacy_input_gets_a_clear_error(replier_server, tenant):
    import socketio

    received: list = []

    async def scenario():
        sio = socketio.AsyncClient(reconnection=False)

        @sio.on("message")
        async def on_message(data):
            received.append(data)

        await sio.connect(
            replier_server.http,
            socketio_path="ws",
            transports=["websocket"],
            headers={"Authorization": tenant.secret, "platform": "qq"},
        )
        try:
            await sio.emit("message", {"message_info": {"platform": "qq"}})  # no segment
            await sio.emit("message", legacy_message("x" * 20000, message_id="big-1", user_id="u-leg").to_dict())
            await sio.emit("message", legacy_message("fine", message_id="leg-ok", user_id="u-leg").to_dict())
            await wait_for(lambda: len(received) >= 3)
        finally:
            await sio.disconnect()

    run(scenario())
    errors = [r["message_info"]["additional_config"]["maitenant"]["error"]["code"] for r in received[:2]]
    assert errors == ["missing_field", "text_too_long"]
    assert received[0]["message_segment"]["data"].startswith("[error missing_field]")
    assert received[2]["message_info"]["message_id"] == "mt-reply:leg-ok"
    assert [m["message_id"] for m in tenant.history("qq", user_id="u-leg")] == ["leg-ok", "mt-reply:leg-ok"]


def test_unauthenticated_socket_never_reaches_the_handler(replier_server):
    import socketio

    async def scenario():
        sio = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(replier_server.http, socketio_path="ws", transports=["websocket"], wait_timeout=5)
        await asyncio.sleep(0)

    run(scenario())
