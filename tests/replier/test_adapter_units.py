"""Units of issue 14: notices and echoes, inline media placeholders, routes of errors (ids as they
arrived), the keyless listener's settings, and the edge's per-tenant slots and frame limits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from types import SimpleNamespace

import pytest
from adapter_support import onebot_message
from maim_message import Seg as LegacySeg
from replier_support import api_message

from replier.core.config import ReplierSettings
from replier.edge import LargeBodies, frame_limit_setter
from replier.keyless import KeylessError, KeylessListener, bind, parse_listen, read_secret, remove_from_environment
from replier.protocol import (
    API,
    LEGACY,
    BadInput,
    Inbound,
    Notice,
    Route,
    build_api_error,
    build_legacy_error,
    media_placeholder,
    parse_api_message,
    parse_envelope,
    parse_legacy_message,
    parse_segments,
    route_of,
)

KEY = "mtk_" + "k" * 43


def _legacy(segments, **kw) -> dict:
    return onebot_message(kw.pop("message_id", 1), segments, **kw).to_dict()


# -- notices ------------------------------------------------------------------------------------
def test_the_adapters_echo_is_a_notice_with_the_platform_id():
    data = _legacy([LegacySeg("text", "x")])
    data["message_info"]["message_id"] = "mt-reply:1"  # reserved for chat messages, fine for an echo
    data["message_segment"] = {"type": "notify", "data": {"sub_type": "echo", "echo": "mt-reply:1", "actual_id": 77}}
    notice = parse_legacy_message(data, 100)
    assert notice == Notice("echo", "qq", "1234567", "7654321", "mt-reply:1", "77")
    # inside a seglist, without "echo" (the message id names the reply), without actual_id
    data["message_segment"] = {"type": "seglist", "data": [{"type": "notify", "data": {"sub_type": "echo"}}]}
    assert parse_legacy_message(data, 100) == Notice("echo", "qq", "1234567", "7654321", "mt-reply:1", None)


def test_other_notifies_are_notices_and_chat_messages_may_not_use_reply_ids():
    poke = _legacy([LegacySeg("notify", {"sub_type": "poke"})])
    assert parse_legacy_message(poke, 100).kind == "poke"
    odd = _legacy([LegacySeg("text", "x")])
    odd["message_segment"] = {"type": "notify", "data": "not an object"}
    assert parse_legacy_message(odd, 100).kind == "unknown"
    chat = _legacy([LegacySeg("text", "hi")])
    chat["message_info"]["message_id"] = "mt-reply:1"
    with pytest.raises(BadInput, match="reserved"):
        parse_legacy_message(chat, 100)


def test_an_api_echo_names_its_chat_as_the_receiver():
    payload = api_message("x", message_id="mt-reply:5", user_id="bot").to_dict()
    payload["message_info"]["receiver_info"] = {"user_info": {"platform": "qq", "user_id": 42}}
    payload["message_segment"] = {"type": "notify", "data": {"sub_type": "echo", "actual_id": "abc"}}
    data = {"ver": 1, "msg_id": "e", "type": "sys_std", "payload": payload}
    notice = parse_api_message(parse_envelope(data), data, 100)
    assert (notice.user_id, notice.reply_id, notice.platform_message_id) == ("42", "mt-reply:5", "abc")


# -- media --------------------------------------------------------------------------------------
def test_inline_media_becomes_a_placeholder_with_size_and_hash():
    raw = os.urandom(3000)
    data = base64.b64encode(raw).decode()
    tree = {"type": "seglist", "data": [{"type": "text", "data": "see "}, {"type": "emoji", "data": data}]}
    parsed = parse_segments(tree, 100, 3000)
    assert parsed.text == "see [emoji]" and parsed.media_chars == len(data) and parsed.media_bytes == 3000
    placeholder = parsed.stored["data"][1]
    assert placeholder == {
        "type": "emoji",
        "data": {"placeholder": True, "encoding": "base64", "bytes": 3000, "sha256": hashlib.sha256(raw).hexdigest()},
    }
    assert tree["data"][1]["data"] == data  # the input is left as it was
    with pytest.raises(BadInput) as exc:
        parse_segments(tree, 100, 2999)
    assert exc.value.code == "media_too_large"
    # the limit is per message: two files count together
    two = {"type": "seglist", "data": [{"type": "image", "data": data}, {"type": "voice", "data": data}]}
    with pytest.raises(BadInput):
        parse_segments(two, 100, 5000)


def test_media_that_is_not_base64_is_described_as_text():
    url = "https://example.com/a.png"
    assert media_placeholder("image", url)["data"] == {
        "placeholder": True,
        "encoding": "text",
        "bytes": len(url),
        "sha256": hashlib.sha256(url.encode()).hexdigest(),
    }
    assert parse_segments({"type": "image", "data": url}, 10, 100).media_bytes == len(url)
    # non-string data is not media data: kept (it counts toward the text payload limit instead)
    parsed = parse_segments({"type": "image", "data": {"file": "x"}}, 10, 0)
    assert parsed.stored == {"type": "image", "data": {"file": "x"}} and parsed.media_chars == 0


# -- routes and id types ------------------------------------------------------------------------
def test_ids_keep_their_json_type_in_routes():
    inbound = parse_legacy_message(_legacy([LegacySeg("text", "hi")], user_id=42, group_id=None), 100)
    assert isinstance(inbound, Inbound)
    assert (inbound.user_id, inbound.user_id_json, inbound.route.user_id) == ("42", 42, 42)
    stringly = parse_legacy_message(_legacy([LegacySeg("text", "hi")], user_id="42", group_id="7"), 100)
    assert stringly.route == Route("qq", "42", "QQ user", "7", "test group")


def test_the_route_of_a_message_that_failed_validation():
    data = _legacy([LegacySeg("text", "x")], user_id=42, group_id=9)
    assert route_of(data, LEGACY) == Route("qq", 42, "QQ user", 9, "test group")
    payload = api_message("x", user_id="u", group_id="g").to_dict()
    assert route_of({"payload": payload}, API) == Route("qq", "u", None, "g", None)
    for garbage in (None, "x", {"payload": 3}, {"message_info": []}):
        assert route_of(garbage, LEGACY) == Route() and route_of(garbage, API) == Route()
    bad = {"message_info": {"platform": "q q", "user_info": {"user_id": True}, "group_info": {"group_id": "x" * 200}}}
    assert route_of(bad, LEGACY) == Route()


def test_errors_carry_the_route_in_both_protocols():
    route = Route("qq", 42, "n", 9, "g")
    legacy = build_legacy_error("media_too_large", "too big", message_id="1", route=route)
    assert legacy["message_info"]["group_info"]["group_id"] == 9
    assert legacy["message_info"]["user_info"]["user_id"] == 42 and legacy["message_info"]["platform"] == "qq"
    api = build_api_error("media_too_large", "too big", msg_id="e", message_id="1", route=route)["payload"]
    assert api["group_info"]["group_id"] == 9 and api["user_info"]["user_id"] == 42 and api["platform"] == "qq"
    bare = build_legacy_error("key_revoked", "gone", platform="wechat")
    assert bare["message_info"]["platform"] == "wechat" and "group_info" not in bare["message_info"]


# -- keyless listener settings ------------------------------------------------------------------
def _settings(**values) -> ReplierSettings:
    return ReplierSettings(_env_file=None, secret_key="s" * 40, **values)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("[::1]:0", ("::1", 0)), ("localhost:1", ("localhost", 1))],
)
def test_listen_addresses(value, parsed):
    assert parse_listen(value) == parsed


@pytest.mark.parametrize("value", ["8000", ":8000", "host:", "host:port", "host:70000"])
def test_bad_listen_addresses(value):
    with pytest.raises(KeylessError, match="host:port"):
        parse_listen(value)


def test_the_key_file_must_be_owner_only_and_hold_an_mtk_key(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    assert read_secret(_settings(keyless_api_key_file=str(path))) == KEY
    path.chmod(0o640)
    with pytest.raises(KeylessError, match="owner only") as exc:
        read_secret(_settings(keyless_api_key_file=str(path)))
    assert KEY not in str(exc.value)
    with pytest.raises(KeylessError, match="cannot read"):
        read_secret(_settings(keyless_api_key_file=str(tmp_path / "missing")))
    with pytest.raises(KeylessError, match="mtk_"):
        read_secret(_settings(keyless_api_key="sk-something"))
    assert read_secret(_settings(keyless_api_key=KEY)) == KEY
    with pytest.raises(KeylessError, match="needs the key"):
        read_secret(_settings())


def test_binding_is_loopback_only_unless_forced():
    assert bind(_settings()) is None
    with pytest.raises(KeylessError, match="not a loopback address"):
        bind(_settings(keyless_listen="0.0.0.0:0", keyless_api_key=KEY))
    listener = bind(_settings(keyless_listen="127.0.0.1:0", keyless_api_key=KEY))
    try:
        host, port = listener.address
        assert host == "127.0.0.1" and port > 0 and KEY not in repr(listener)
        assert listener.serves({"server": ("127.0.0.1", port)})
        assert not listener.serves({"server": ("127.0.0.1", port + 1)})
        assert not listener.serves({}) and not listener.serves(None)
        with pytest.raises(KeylessError, match="cannot listen"):  # the port is taken
            bind(_settings(keyless_listen=f"127.0.0.1:{port}", keyless_api_key=KEY))
    finally:
        listener.sock.close()
    forced = bind(_settings(keyless_listen="0.0.0.0:0", keyless_api_key=KEY, keyless_allow_remote=True))
    forced.sock.close()
    with pytest.raises(KeylessError):
        bind(_settings(keyless_listen="no-such-host.invalid:0", keyless_api_key=KEY, keyless_allow_remote=True))


def test_the_key_leaves_the_environment(monkeypatch):
    monkeypatch.setenv("KEYLESS_API_KEY", KEY)
    remove_from_environment()
    assert "KEYLESS_API_KEY" not in os.environ


def test_the_listener_compares_the_socket_address_only():
    listener = KeylessListener(("::1", 8000), KEY)
    assert listener.serves({"server": ("::1", 8000, 0, 0)})
    assert not listener.serves({"server": ("127.0.0.1", 8000), "headers": [(b"host", b"[::1]:8000")]})


# -- the edge -----------------------------------------------------------------------------------
def test_large_bodies_wait_per_tenant_and_never_for_another_tenant():
    async def scenario():
        slots = LargeBodies(per_tenant=1)
        order = []
        first = slots.slot("t1")
        await first.__aenter__()

        async def second():
            async with slots.slot("t1"):
                order.append("t1 second")

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0)
        async with slots.slot("t2"):  # another tenant is not held up
            order.append("t2")
        assert slots.in_use("t1") == 2 and order == ["t2"]
        await first.__aexit__(None, None, None)
        await waiting
        assert order == ["t2", "t1 second"] and slots.in_use("t1") == 0 and not slots._slots

    asyncio.run(scenario())


def test_the_frame_limit_follows_authentication_on_uvicorns_sansio_websocket():
    conn = SimpleNamespace(max_message_size=1)
    receive = SimpleNamespace(conn=conn).__class__  # not a bound method: no protocol behind it
    assert frame_limit_setter(receive, 10, 20) is None

    class Protocol:
        def __init__(self) -> None:
            self.conn = conn

        async def receive(self):
            return {}

    set_limit = frame_limit_setter(Protocol().receive, 10, 20)
    set_limit(False)
    assert conn.max_message_size == 10
    set_limit(True)
    assert conn.max_message_size == 20
    conn.max_message_size = None  # an implementation without a per-frame limit
    assert frame_limit_setter(Protocol().receive, 10, 20) is None


def test_the_default_media_limit_is_ten_mib_and_the_message_limit_makes_room_for_an_error():
    settings = _settings()
    assert settings.max_media_bytes == 10 * 1024 * 1024
    assert settings.max_message_bytes > settings.max_payload_bytes + 2 * settings.max_media_bytes * 4 // 3


def test_a_localhost_listener_is_loopback():
    listener = bind(_settings(keyless_listen="localhost:0", keyless_api_key=KEY))
    try:
        assert listener.address[1] > 0
    finally:
        listener.sock.close()


def test_only_a_dict_can_be_a_notify_segment():
    from replier.protocol import _notify

    assert _notify("notify") is None and _notify({"type": "seglist", "data": "x"}) is None


def test_a_message_over_the_largest_size_is_refused_before_parsing():
    from replier.inbound import Intake

    owner = SimpleNamespace(settings=_settings(max_payload_bytes=1024, max_media_bytes=0))
    assert Intake._check_size(owner, {"a": "b"}) == len(b'{"a":"b"}')
    with pytest.raises(BadInput) as exc:
        Intake._check_size(owner, {"a": "b" * 2000})
    assert exc.value.code == "payload_too_large"


def test_an_echo_whose_store_job_fails_is_logged_and_dropped(caplog):
    from replier.connections import Connection
    from replier.echoes import Echoes
    from replier.metrics import Metrics

    class FailingStore:
        async def run(self, *args):
            raise RuntimeError("database down")

    shared = SimpleNamespace(
        settings=None, store=FailingStore(), metrics=Metrics(), connections=None, outbox=None, limits=None
    )
    conn = Connection("sid", "conn_1", LEGACY, "key_1", "ten_1", "agt_1", "qq", "")
    echo = Notice("echo", "qq", "1", None, "mt-reply:1", "9")
    asyncio.run(Echoes(shared).accept(conn, echo))
    assert "storing the platform id of reply 'mt-reply:1' failed" in caplog.text


def test_an_echo_lost_to_a_database_outage_goes_to_the_throttled_fault_log(caplog):
    from playhouse.pool import MaxConnectionsExceeded

    from replier.connections import Connection
    from replier.echoes import Echoes
    from replier.metrics import Metrics

    class DownStore:
        async def run(self, *args):
            raise MaxConnectionsExceeded("pool exhausted")

    shared = SimpleNamespace(
        settings=None, store=DownStore(), metrics=Metrics(), connections=None, outbox=None, limits=None
    )
    conn = Connection("sid", "conn_1", LEGACY, "key_1", "ten_1", "agt_1", "qq", "")
    asyncio.run(Echoes(shared).accept(conn, Notice("echo", "qq", "1", None, "mt-reply:2", "9")))
    assert "database_unavailable: adapter echo failed" in caplog.text
    assert "storing the platform id" not in caplog.text
