"""Real MaiBot adapters, unmodified (issue 14): a MaiBot-Napcat-Adapter-like legacy `Router` without a
token on the keyless listener, and maim_message's `WebSocketClient` with a key, against a real
`python -m replier` (MAX_MEDIA_BYTES=2 MiB here, to keep the over-the-limit case small).

Both send what QQ users send: integer ids, base64 images of 20 KiB, 200 KiB and 1.2 MiB, emoji and
voice, an image over the limit; the adapter echoes every message it delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
import websocket
from adapter_support import PLATFORM, NapcatLikeAdapter, media, onebot_message
from edge_support import (
    EIO,
    close_frame,
    open_polling,
    open_websocket,
    post_head,
    raw_request,
    status_of,
    wait_until,
)
from edge_support import socketio_connect as ws_socketio_connect
from maim_message import Seg as LegacySeg
from maim_message.message import APIMessageBase, BaseMessageInfo, GroupInfo, MessageDim, Seg, SenderInfo, UserInfo
from replier_support import MaimClient, ReplierProcess, TenantAgent, make_tenant, run, socketio_connect, wait_for

from testsupport.servers import free_port

MAX_MEDIA = 2 * 1024 * 1024
SIZES = {"20 KiB": 20 * 1024, "200 KiB": 200 * 1024, "1.2 MiB": 1_258_291}
OVER = MAX_MEDIA + 4096


class KeylessReplier(ReplierProcess):
    """A replier with a keyless listener standing for `tenant`'s key (given in an owner-only file)."""

    def __init__(self, provisioned, tenant: TenantAgent, **env: str) -> None:
        self.keyless_port = free_port()
        fd, key_file = tempfile.mkstemp(prefix="keyless-", suffix=".key")
        os.write(fd, tenant.secret.encode() + b"\n")
        os.close(fd)
        os.chmod(key_file, 0o600)
        self.key_file = key_file
        super().__init__(
            provisioned.url,
            provisioned.app_role,
            KEYLESS_LISTEN=f"127.0.0.1:{self.keyless_port}",
            KEYLESS_API_KEY_FILE=key_file,
            MAX_MEDIA_BYTES=str(MAX_MEDIA),
            **env,
        )

    @property
    def keyless_url(self) -> str:
        return f"ws://127.0.0.1:{self.keyless_port}/ws"

    @property
    def keyless_http(self) -> str:
        return f"http://127.0.0.1:{self.keyless_port}"

    def stop(self, *args, **kwargs):
        try:
            return super().stop(*args, **kwargs)
        finally:
            os.unlink(self.key_file)


@pytest.fixture(scope="module")
def keyless_tenant(configured_db) -> TenantAgent:
    return make_tenant()


@pytest.fixture(scope="module")
def adapter_server(provisioned, keyless_tenant) -> Iterator[KeylessReplier]:
    server = KeylessReplier(provisioned, keyless_tenant)
    server.start()
    yield server
    server.stop()


def _stored(tenant: TenantAgent, **peer) -> list[dict]:
    return tenant.history(PLATFORM, **peer)


def _replies(tenant: TenantAgent, **peer) -> list[dict]:
    return [m for m in _stored(tenant, **peer) if m["direction"] == "out"]


def _image_segments(label: str, kind: str = "image") -> tuple[list[LegacySeg], str, int]:
    data, digest = media(SIZES[label])
    return [LegacySeg("text", f"look ({label})"), LegacySeg(kind, data)], digest, SIZES[label]


def _assert_placeholder(stored_segments: dict, kind: str, size: int, digest: str) -> None:
    """The stored message has the file's type, size and hash, and none of its data."""
    children = stored_segments["data"]
    placeholder = next(c for c in children if c["type"] == kind)
    assert placeholder["data"] == {"placeholder": True, "encoding": "base64", "bytes": size, "sha256": digest}
    assert len(json.dumps(stored_segments)) < 2000


# -- the Napcat-like adapter on the keyless listener -----------------------------------------------
def test_napcat_like_adapter_chats_through_the_keyless_listener(adapter_server, keyless_tenant):
    ta = keyless_tenant
    group, user = 7654321, 1234567
    hashes: dict[int, tuple[str, str, int]] = {}

    async def scenario():
        adapter = await NapcatLikeAdapter(adapter_server.keyless_url).start()
        replies, errors = [], []
        try:
            message_id = 1000
            await adapter.send(onebot_message(message_id, [LegacySeg("text", "hello bot")], user_id=user))
            replies.append(await adapter.next())
            for label in SIZES:
                message_id += 1
                segments, digest, size = _image_segments(label)
                hashes[message_id] = ("image", digest, size)
                await adapter.send(onebot_message(message_id, segments, user_id=user))
                replies.append(await adapter.next())
            for kind in ("emoji", "voice"):
                message_id += 1
                data, digest = media(50_000)
                hashes[message_id] = (kind, digest, 50_000)
                await adapter.send(onebot_message(message_id, [LegacySeg(kind, data)], user_id=user))
                replies.append(await adapter.next())
            message_id += 1
            data, _ = media(OVER)
            await adapter.send(onebot_message(message_id, [LegacySeg("text", "huge"), LegacySeg("image", data)]))
            errors.append(await adapter.next())
            message_id += 1  # the connection carries on after the error
            await adapter.send(onebot_message(message_id, [LegacySeg("text", "still there?")], user_id=user))
            replies.append(await adapter.next())
            # A private chat; the same user once as 42 and once as "42": one chat stream.
            await adapter.send(onebot_message(2000, [LegacySeg("text", "private 1")], user_id=42, group_id=None))
            replies.append(await adapter.next())
            await adapter.send(onebot_message(2001, [LegacySeg("text", "private 2")], user_id="42", group_id=None))
            replies.append(await adapter.next())
            # Every reply is echoed; an echo is answered with nothing (the next message is this reply).
            await wait_for(lambda: len(adapter.echoed) == len(replies) + len(errors))
            # Other notifies (a poke, as the adapter's notice handler sends one) and an echo of a reply
            # that does not exist are accepted silently too.
            poke = onebot_message(0, [LegacySeg("notify", {"sub_type": "poke", "target_id": 1})], user_id=user)
            poke.message_info.message_id = "notice"
            await adapter.send(poke)
            stray = onebot_message(
                0, [LegacySeg("notify", {"sub_type": "echo", "echo": "mt-reply:none", "actual_id": 1})]
            )
            stray.message_info.message_id = "mt-reply:none"
            await adapter.send(stray)
            await adapter.send(onebot_message(3000, [LegacySeg("text", "last")], user_id=user))
            replies.append(await adapter.next())
            assert adapter.received.empty()
            assert adapter.connected()
            await wait_for(lambda: "mt-reply:3000" in adapter.echoed)
            await wait_for(lambda: all(m["platform_message_id"] for m in _replies(ta, group_id=str(group))))
        finally:
            await adapter.stop()
        return adapter, replies, errors

    adapter, replies, errors = run(scenario())
    # Replies: to the right chat, ids back as integers (and as a string where one was sent).
    for reply in replies[:-3] + replies[-1:]:
        info = reply["message_info"]
        assert info["message_id"].startswith("mt-reply:")
        assert info["group_info"]["group_id"] == group and isinstance(info["group_info"]["group_id"], int)
        assert info["user_info"]["user_id"] == user and isinstance(info["user_info"]["user_id"], int)
    assert (
        replies[-3]["message_info"]["user_info"]["user_id"] == 42
        and replies[-3]["message_info"].get("group_info") is None
    )
    assert replies[-2]["message_info"]["user_info"]["user_id"] == "42"
    # Over the limit: an error in the same chat, with the ids as they came.
    (error,) = errors
    assert error["message_info"]["message_id"].startswith("mt-error:")
    assert error["message_info"]["additional_config"]["maitenant"]["error"]["code"] == "media_too_large"
    assert error["message_info"]["group_info"]["group_id"] == group
    assert isinstance(error["message_info"]["user_info"]["user_id"], int)
    assert error["message_segment"]["data"].startswith("[error media_too_large]")

    history = _stored(ta, group_id=str(group))
    inbound = {m["message_id"]: m for m in history if m["direction"] == "in"}
    assert set(inbound) == {str(i) for i in (1000, 1001, 1002, 1003, 1004, 1005, 1007, 3000)}  # not 1006, no echo
    for message_id, (kind, digest, size) in hashes.items():
        _assert_placeholder(inbound[str(message_id)]["segments"], kind, size, digest)
    assert inbound["1001"]["text"] == "look (20 KiB)[image]"
    # Each reply has the platform's id from its echo (queryable history; the API test is in tests/configurator).
    out = {m["message_id"]: m for m in history if m["direction"] == "out"}
    assert len(out) == 8
    for reply_id, row in out.items():
        assert row["platform_message_id"] == str(adapter.echoed[reply_id])
    private = _stored(ta, user_id="42")
    assert [m["message_id"] for m in private if m["direction"] == "in"] == ["2000", "2001"]
    logs = adapter_server.logs()
    assert f"KEYLESS LISTENER on 127.0.0.1:{adapter_server.keyless_port}" in logs
    assert ta.secret not in logs
    assert "media_too_large" in logs  # the rejected message is logged (INFO)
    assert "echo for reply 'mt-reply:none'" in logs and "no such reply in that chat" in logs


def test_a_client_without_a_key_is_refused_on_the_main_port_and_accepted_on_the_keyless_one(adapter_server):
    """The headers a legacy Router without a token sends; only the listening socket differs. Headers
    naming the keyless address (Host, forwarding) change nothing on the main port."""
    legacy = {"platform": PLATFORM}
    keyless_url = adapter_server.keyless_url
    assert "missing api key" in run(socketio_connect(adapter_server.url, legacy))["message"]
    assert run(socketio_connect(keyless_url, legacy)) is None
    forged = {
        **legacy,
        "x-forwarded-host": f"127.0.0.1:{adapter_server.keyless_port}",
        "x-forwarded-port": str(adapter_server.keyless_port),
        "forwarded": f"host=127.0.0.1:{adapter_server.keyless_port}",
    }
    assert "missing api key" in run(socketio_connect(adapter_server.url, forged))["message"]


# -- maim_message's WebSocketClient with a key: the same cases ---------------------------------------
def _api_message(message_id: str, segment: Seg, *, user_id=1234567, group_id=7654321) -> APIMessageBase:
    sender = SenderInfo(
        group_info=GroupInfo(PLATFORM, group_id, "test group") if group_id else None,
        user_info=UserInfo(PLATFORM, user_id, "QQ user"),
    )
    return APIMessageBase(
        message_info=BaseMessageInfo(platform=PLATFORM, message_id=message_id, time=time.time(), sender_info=sender),
        message_segment=segment,
        message_dim=MessageDim(api_key="ignored", platform=PLATFORM),
    )


def test_websocket_client_with_a_key_sends_media_and_echoes(adapter_server):
    ta = make_tenant()
    hashes = {}

    async def scenario():
        client = await MaimClient(adapter_server.url, ta.secret).start()
        replies = []
        try:
            for i, label in enumerate(SIZES):
                data, digest = media(SIZES[label])
                hashes[f"w-{i}"] = digest
                segment = Seg("seglist", [Seg("text", label), Seg("image", data)])
                await client.send(_api_message(f"w-{i}", segment))
                replies.append(await client.reply())
            data, _ = media(OVER)
            await client.send(_api_message("w-over", Seg("seglist", [Seg("text", "x"), Seg("image", data)])))
            error = await client.error()
            # An API-Server client echoing a delivered reply (notify/echo with the platform's id).
            echo = APIMessageBase.from_dict(replies[0].to_dict())
            echo.message_segment = Seg("notify", {"sub_type": "echo", "echo": "mt-reply:w-0", "actual_id": 555})
            await client.send(echo)
            await client.send(_api_message("w-last", Seg("text", "last"), user_id=42, group_id=None))
            replies.append(await client.reply())
            assert client.errors.empty()
        finally:
            await client.stop()
        return replies, error

    replies, error = run(scenario())
    for reply in replies[:-1]:
        receiver = reply.message_info.receiver_info
        assert receiver.group_info.group_id == 7654321 and receiver.user_info.user_id == 1234567
    assert replies[-1].message_info.receiver_info.user_info.user_id == 42
    assert error["code"] == "media_too_large" and error["message_id"] == "w-over"
    assert error["group_info"]["group_id"] == 7654321 and error["user_info"]["user_id"] == 1234567
    history = _stored(ta, group_id="7654321")
    inbound = {m["message_id"]: m for m in history if m["direction"] == "in"}
    assert set(inbound) == set(hashes)
    for message_id, digest in hashes.items():
        stored = inbound[message_id]["segments"]["data"][1]["data"]
        assert stored["sha256"] == digest and stored["placeholder"] is True

    def echoed() -> bool:
        rows = {m["message_id"]: m for m in _stored(ta, group_id="7654321")}
        return rows["mt-reply:w-0"]["platform_message_id"] == "555"

    run(wait_for(echoed))


# -- revocation: the keyless listener's key ----------------------------------------------------------
def test_revoking_the_keyless_key_closes_its_connections_with_a_reason_and_refuses_new_ones(provisioned, configured_db):
    ta = make_tenant()
    server = KeylessReplier(provisioned, ta)
    server.start()
    try:

        async def scenario():
            adapter = await NapcatLikeAdapter(server.keyless_url).start()
            try:
                await adapter.send(onebot_message(1, [LegacySeg("text", "before revoke")]))
                await adapter.next()
                ta.revoke()
                told = await adapter.next()
                await wait_for(lambda: not adapter.connected(), timeout=15)
            finally:
                await adapter.stop()
            return told, (await socketio_connect(server.keyless_url, {"platform": PLATFORM}))["message"]

        told, refusal = run(scenario())
        assert told["message_info"]["additional_config"]["maitenant"]["error"]["code"] == "key_revoked"
        assert told["message_segment"]["data"].startswith("[error key_revoked]")
        assert "api key revoked" in refusal
        logs = server.logs()
        assert f"key id {ta.key_id}" in logs and "its api key is no longer valid" in logs
    finally:
        server.stop()


def test_a_keyless_listener_that_cannot_be_used_stops_the_start(provisioned, configured_db):
    """Exit 2 with the reason on stderr (never the key), each case in its own process, run at once."""
    revoked = make_tenant()
    revoked.revoke()
    port = free_port()
    # One case of each path (bad settings; a key the database refuses). The other reasons are units
    # (tests/replier/test_adapter_units.py), since each process costs a start of the replier.
    cases = [
        ({"KEYLESS_LISTEN": f"0.0.0.0:{port}", "KEYLESS_API_KEY": revoked.secret}, "not a loopback address"),
        ({"KEYLESS_LISTEN": f"127.0.0.1:{port}", "KEYLESS_API_KEY": revoked.secret}, "api key revoked"),
    ]
    processes = []
    for env, _ in cases:
        template = ReplierProcess(provisioned.url, provisioned.app_role, **env)  # its settings only
        template.log_path.unlink(missing_ok=True)
        settings = template.env
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "replier"], env=settings, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for process, (_, reason) in zip(processes, cases, strict=True):
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == 2, output
        assert "refusing to start: " in output and reason in output
        assert revoked.secret not in output


def test_many_large_messages_of_one_tenant_wait_for_their_slots(adapter_server):
    """Eight 1.2 MiB images at once over four connections of one tenant, two slots each: all answered."""
    ta = make_tenant()

    async def scenario():
        clients = [await MaimClient(adapter_server.url, ta.secret).start() for _ in range(4)]
        try:
            data, _ = media(SIZES["1.2 MiB"])
            sends = []
            for n, client in enumerate(clients):
                for k in range(2):
                    message = _api_message(f"burst-{n}-{k}", Seg("image", data), user_id=100 + n, group_id=None)
                    sends.append(client.send(message))
            await asyncio.gather(*sends)
            return [await client.reply() for client in clients for _ in range(2)]
        finally:
            for client in clients:
                await client.stop()

    replies = run(scenario())
    assert len(replies) == 8


def test_large_messages_over_long_polling_and_bodies_over_the_message_limit(adapter_server):
    """A polling-only client (as maim's clients start) sends a 1.2 MiB image in a POST body; a body
    over even the authenticated limit is refused with 413 and a WARNING line, never silently."""
    ta = make_tenant()
    data, digest = media(SIZES["1.2 MiB"])

    # Engine.IO long-polling by hand (a client's disconnect would wait for its pending poll).
    with httpx.Client(timeout=30) as client:
        sid = open_polling(client, adapter_server, **{"x-apikey": ta.secret, "x-platform": PLATFORM})
        url = f"{adapter_server.http}/ws/?{EIO}&sid={sid}"
        assert client.post(url, content=b"40").status_code == 200
        assert client.get(url).text.startswith("40")
        message = _api_message("poll-1", Seg("seglist", [Seg("text", "via polling"), Seg("image", data)]))
        envelope = {"ver": 1, "msg_id": "env-poll-1", "type": "sys_std", "payload": message.to_dict()}
        body = ("42" + json.dumps(["message", envelope])).encode()
        assert len(body) > 1_100_000  # over the pre-auth limit
        assert client.post(url, content=body).status_code == 200
        received = ""
        while "mt-reply:poll-1" not in received:
            received += client.get(url).text
        client.post(url, content=b"1")  # Engine.IO close
    (stored,) = [m for m in _stored(ta, group_id="7654321") if m["direction"] == "in"]
    assert stored["segments"]["data"][1]["data"]["sha256"] == digest

    # An authenticated polling session declaring more than the largest message: 413, logged.
    with httpx.Client(timeout=10) as client:
        sid = open_polling(client, adapter_server, **{"x-apikey": ta.secret, "x-platform": PLATFORM})
        assert client.post(f"{adapter_server.http}/ws/?{EIO}&sid={sid}", content=b"40").status_code == 200
        wait_until(lambda: client.get(f"{adapter_server.http}/ws/?{EIO}&sid={sid}").text.startswith("40"))
        answer = raw_request(adapter_server.port, post_head(sid, length=20 * MAX_MEDIA), b"4" * 1000)
        assert status_of(answer) == 413
    assert "over the" in adapter_server.logs() and "MAX_MEDIA_BYTES" in adapter_server.logs()
    # Before authentication the small limit stays (tests/replier/test_preauth.py has the rest).
    with httpx.Client(timeout=10) as client:
        sid = open_polling(client, adapter_server)
        answer = raw_request(adapter_server.port, post_head(sid, length=1_100_000), b"4" * 1000)
        assert status_of(answer) == 413


def test_a_websocket_frame_limit_follows_authentication(adapter_server):
    """Before the Socket.IO connect, a frame over 1 MB is refused from its header (1009); after it,
    a 1.2 MiB image passes and a frame over the largest message is refused, each logged at WARNING."""
    ta = make_tenant()
    headers = [f"x-apikey: {ta.secret}", f"x-platform: {PLATFORM}"]
    big = websocket.ABNF.create_frame("4" + "x" * 1_100_000, websocket.ABNF.OPCODE_TEXT).format()
    ws = open_websocket(adapter_server, headers)
    ws.sock.sendall(big[:4096])
    assert close_frame(ws, timeout=10)[0] == 1009
    ws.close()
    ws = open_websocket(adapter_server, headers)
    assert ws_socketio_connect(ws).startswith("40")
    data, _ = media(SIZES["1.2 MiB"])
    message = _api_message("ws-big", Seg("image", data)).to_dict()
    envelope = {"ver": 1, "msg_id": "env-ws-big", "type": "sys_std", "payload": message}
    ws.send("42" + json.dumps(["message", envelope]))
    answers = []
    while not any('"sys_std"' in a for a in answers):
        answers.append(ws.recv())
    huge = websocket.ABNF.create_frame("4" + "x" * (40 * MAX_MEDIA), websocket.ABNF.OPCODE_TEXT).format()
    ws.sock.sendall(huge[:4096])
    assert close_frame(ws, timeout=10)[0] == 1009
    ws.close()
    logs = adapter_server.logs()
    assert "over the 1000000-byte limit (not authenticated" in logs
    assert "-byte limit (authenticated; MAX_MEDIA_BYTES)" in logs


def test_two_adapters_of_one_agent_in_one_group_each_get_only_their_replies(adapter_server, keyless_tenant):
    """Two Napcat-like adapters on the keyless listener (one agent) speak in the same group: each reply
    goes to the adapter whose message it answers, so QQ sees it posted once (no fan-out)."""

    async def scenario():
        first = await NapcatLikeAdapter(adapter_server.keyless_url).start()
        second = await NapcatLikeAdapter(adapter_server.keyless_url).start()
        try:
            group = 5550001
            await first.send(onebot_message(4001, [LegacySeg("text", "from the first")], group_id=group))
            one = await first.next()
            await second.send(onebot_message(4002, [LegacySeg("text", "from the second")], group_id=group))
            two = await second.next()
            await first.send(onebot_message(4003, [LegacySeg("text", "first again")], group_id=group))
            three = await first.next()
            await wait_for(lambda: len(first.echoed) == 2 and len(second.echoed) == 1)
            assert first.received.empty() and second.received.empty()
        finally:
            await first.stop()
            await second.stop()
        return one, two, three

    one, two, three = run(scenario())
    assert [m["message_info"]["message_id"] for m in (one, two, three)] == [
        "mt-reply:4001",
        "mt-reply:4002",
        "mt-reply:4003",
    ]


def test_a_reused_message_id_with_new_text_is_a_new_message(adapter_server, keyless_tenant):
    """QQ (and maim_message's examples) reuse message ids: the same id with other text is answered
    as the new message it is and stored; an identical resend is the same message (its reply again)."""
    group = 5550002

    async def scenario():
        adapter = await NapcatLikeAdapter(adapter_server.keyless_url).start()
        try:
            answers = []
            for text in ("first text", "second text", "second text"):
                await adapter.send(onebot_message(6000, [LegacySeg("text", text)], group_id=group))
                answers.append(await adapter.next())
        finally:
            await adapter.stop()
        return answers

    first, second, again = run(scenario())
    assert "first text" in first["message_segment"]["data"]
    assert "second text" in second["message_segment"]["data"]
    assert second["message_info"]["message_id"] != first["message_info"]["message_id"]
    assert again["message_info"]["message_id"] == second["message_info"]["message_id"]
    inbound = [m["text"] for m in _stored(keyless_tenant, group_id=str(group)) if m["direction"] == "in"]
    assert inbound == ["first text", "second text"]
