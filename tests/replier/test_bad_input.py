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


async def _legacy_client(server, secret: str, received: list):
    """A legacy-protocol (`Router`-style) python-socketio client whose inbound messages go to `received`."""
    import socketio

    sio = socketio.AsyncClient(reconnection=False)

    @sio.on("message")
    async def on_message(data):
        received.append(data)

    await sio.connect(
        server.http, socketio_path="ws", transports=["websocket"], headers={"Authorization": secret, "platform": "qq"}
    )
    return sio


def test_bad_legacy_input_gets_a_clear_error(replier_server, tenant):

    received: list = []

    async def scenario():
        sio = await _legacy_client(replier_server, tenant.secret, received)
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


# Socket.IO binary events: python-socketio's client sends one whenever the data holds `bytes`, and the
# server hands the handler the attachments as `bytes` inside the data. Segments are stored as JSON.
BINARY_SEGMENTS = [
    ("small image", {"type": "image", "data": b"\x89PNG\r\n\x1a\n" + b"\x00" * 32}, "invalid_segment"),
    (
        "bytes in a seglist",
        {"type": "seglist", "data": [{"type": "text", "data": "hi "}, {"type": "image", "data": b"\x01"}]},
        "invalid_segment",
    ),
    ("bytes as at", {"type": "at", "data": b"bob"}, "invalid_segment"),
    ("40 KB image", {"type": "image", "data": b"\xff" * 40_000}, "invalid_segment"),
    ("200 KB image", {"type": "image", "data": b"\xff" * 200_000}, "invalid_segment"),  # any size: not JSON
]


def _no_processing_failures(server, prefix: str) -> None:
    logs = server.logs()
    assert f"processing message '{prefix}" not in logs
    assert "is not JSON serializable" not in logs


def test_binary_segments_get_a_validation_error_over_the_api_protocol(replier_server):
    import socketio

    ta = make_tenant()

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret)
        errors = {}
        try:
            for i, (label, segment, _code) in enumerate(BINARY_SEGMENTS):
                payload = api_message("x", message_id=f"bin-api-{i}", user_id=f"u-bin-{i}").to_dict()
                payload["message_segment"] = segment
                envelope = _envelope(f"bin-env-{i}", payload)
                assert socketio.packet.Packet.data_is_binary(envelope)  # sent as a binary event
                await sio.emit("message", envelope)
                errors[label] = (await next_of(inbox, "custom_error"))["payload"]
            assert sio.connected
            good = api_message("after binary", message_id="bin-api-good", user_id="u-bin-good").to_dict()
            await sio.emit("message", _envelope("bin-env-good", good))
            reply = await next_of(inbox, "sys_std")
            assert reply["payload"]["message_info"]["message_id"] == "mt-reply:bin-api-good"
        finally:
            await sio.disconnect()
        return errors

    errors = run(scenario())
    assert {label: e["code"] for label, e in errors.items()} == {label: code for label, _, code in BINARY_SEGMENTS}
    for i, (label, _, _) in enumerate(BINARY_SEGMENTS):
        assert errors[label]["msg_id"] == f"bin-env-{i}"
        assert errors[label]["message_id"] == f"bin-api-{i}"
    assert "binary data" in errors["small image"]["message"]
    for i in range(len(BINARY_SEGMENTS)):
        assert ta.history("qq", user_id=f"u-bin-{i}") == []
    assert Scoped(ta.ctx).chat_streams.count() == 1  # only the good message's stream
    _no_processing_failures(replier_server, "bin-api-")


def test_binary_segments_get_a_validation_error_over_the_legacy_protocol(replier_server):

    ta = make_tenant()
    received: list = []

    async def scenario():
        sio = await _legacy_client(replier_server, ta.secret, received)
        try:
            for i, (_label, segment, _code) in enumerate(BINARY_SEGMENTS):
                data = legacy_message("x", message_id=f"bin-leg-{i}", user_id=f"l-bin-{i}").to_dict()
                data["message_segment"] = segment
                await sio.emit("message", data)
            await sio.emit("message", legacy_message("fine", message_id="bin-leg-ok", user_id="l-bin-ok").to_dict())
            await wait_for(lambda: len(received) >= len(BINARY_SEGMENTS) + 1)
            assert sio.connected
        finally:
            await sio.disconnect()

    run(scenario())
    errors = [r["message_info"]["additional_config"]["maitenant"]["error"] for r in received[: len(BINARY_SEGMENTS)]]
    assert [e["code"] for e in errors] == [code for _, _, code in BINARY_SEGMENTS]
    assert [e["message_id"] for e in errors] == [f"bin-leg-{i}" for i in range(len(BINARY_SEGMENTS))]
    assert received[0]["message_segment"]["data"].startswith("[error invalid_segment] segments must be JSON")
    assert received[-1]["message_info"]["message_id"] == "mt-reply:bin-leg-ok"
    for i in range(len(BINARY_SEGMENTS)):
        assert ta.history("qq", user_id=f"l-bin-{i}") == []
    assert [m["message_id"] for m in ta.history("qq", user_id="l-bin-ok")] == ["bin-leg-ok", "mt-reply:bin-leg-ok"]
    assert Scoped(ta.ctx).chat_streams.count() == 1
    _no_processing_failures(replier_server, "bin-leg-")


def test_json_nested_deeper_than_the_encoder_allows_gets_a_validation_error(replier_server):
    """orjson parses 1,024 levels but serialises only 254: the size check must not crash on the rest."""
    ta = make_tenant()
    deep: list = []
    node = deep
    for _ in range(300):
        node.append([])
        node = node[0]

    async def scenario():
        sio, inbox = await raw_client(replier_server.http, ta.secret)
        try:
            payload = api_message("hi", message_id="deep-1", user_id="u-deep").to_dict()
            payload["message_info"]["additional_config"] = {"deep": deep}
            await sio.emit("message", _envelope("deep-env", payload))
            error = (await next_of(inbox, "custom_error"))["payload"]
            good = api_message("still here", message_id="deep-ok", user_id="u-deep").to_dict()
            await sio.emit("message", _envelope("deep-env-ok", good))
            reply = await next_of(inbox, "sys_std")
            return error, reply
        finally:
            await sio.disconnect()

    error, reply = run(scenario())
    assert (error["code"], error["msg_id"], error["message_id"]) == ("invalid_payload", "deep-env", "deep-1")
    assert reply["payload"]["message_info"]["message_id"] == "mt-reply:deep-ok"
    assert [m["message_id"] for m in ta.history("qq", user_id="u-deep")] == ["deep-ok", "mt-reply:deep-ok"]
    assert "Recursion limit reached" not in replier_server.logs()
