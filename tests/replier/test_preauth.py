"""Before authentication: request bodies, unauthenticated sessions, per-address limits and malformed
frames, against real `python -m replier` subprocesses with raw clients (issue #10, finding 2)."""

from __future__ import annotations

import asyncio
import re

import httpx
import socketio
import websocket
from edge_support import (
    EIO,
    LimitedReplier,
    close_frame,
    health,
    metric,
    open_polling,
    open_websocket,
    polling_handshake,
    post_head,
    raw_request,
    refused_websocket,
    serving,
    socketio_connect,
    status_of,
    wait_until,
)
from replier_support import api_message, make_tenant, run
from test_compat import _envelope, next_of, raw_client

OVER_LIMIT = 1_100_000  # the limit is max(1 MB, 4 x MAX_PAYLOAD_BYTES)


async def _still_answers(server, secret: str, message_id: str, upgrade: bool = False) -> None:
    """A real authenticated client connects, sends a chat message and gets its ack and reply; with
    `upgrade`, over long-polling first and then upgraded to a websocket, as Socket.IO clients do."""
    if upgrade:
        sio, inbox = await _polling_client(server, secret, transports=["polling", "websocket"])
        await asyncio.to_thread(wait_until, lambda: sio.transport() == "websocket")
    else:
        sio, inbox = await raw_client(server.http, secret)
    try:
        payload = api_message("are you there?", message_id=message_id, user_id="u-edge").to_dict()
        await sio.emit("message", _envelope(f"env-{message_id}", payload))
        reply = await next_of(inbox, "sys_std")
        assert reply["payload"]["message_info"]["message_id"] == f"mt-reply:{message_id}"
    finally:
        await sio.disconnect()


def test_oversized_partial_posts_no_longer_leak_descriptors(provisioned, configured_db):
    """200 polling POSTs declaring 1.1 MB with 200 KB sent, then the client closes. Upstream never
    answered them, and since uvicorn stops reading after 64 KiB it never saw the client leave: one fd
    kept per request, until RLIMIT_NOFILE made the replier refuse everyone and fail /health."""
    ta = make_tenant()
    server = LimitedReplier(provisioned.url, provisioned.app_role, nofile=256, FORWARDED_ALLOW_IPS="")
    server.start()
    try:
        assert "open-files limit 256" in server.logs()
        with httpx.Client(timeout=10) as client:  # warm up: Engine.IO's service task, a poll, /health
            open_polling(client, server)
            assert health(server)["status"] == "ok"
        baseline = wait_until(lambda: server.fds(), timeout=5)
        partial = b"x" * 200_000
        with httpx.Client(timeout=10) as client:
            for _ in range(200):
                sid = open_polling(client, server)
                raw_request(server.port, post_head(sid, length=OVER_LIMIT), partial, read=False)
        # Small slack for database connections opened later; the old code kept all 200.
        wait_until(lambda: server.fds() <= baseline + 10, timeout=30)
        assert health(server)["status"] == "ok"
        run(_still_answers(server, ta.secret, "fd-1"))
        assert metric(server, "replier_edge_refused_total", reason="body_too_large") == 200
    finally:
        server.stop()
    assert "Traceback" not in server.logs()


def test_request_bodies_are_limited_before_engineio_reads_them(provisioned):
    with (
        serving(provisioned, HTTP_BODY_TIMEOUT_SECONDS="1", AUTH_TIMEOUT_SECONDS="60") as server,
        httpx.Client(timeout=10) as client,
    ):
        # Declared over the limit: 413 at once, the connection closed, nothing read.
        sid = open_polling(client, server)
        answer = raw_request(server.port, post_head(sid, length=OVER_LIMIT), b"4x" * 500)
        assert status_of(answer) == 413
        assert b"connection: close" in answer.lower()
        # Chunked (no Content-Length): counted as it arrives and cut at the limit.
        chunk = b"%x\r\n%s\r\n" % (100_000, b"4" * 100_000)
        answer = raw_request(server.port, post_head(sid, length=None), chunk * 11)
        assert status_of(answer) == 413
        # A chunked body within the limit reaches Engine.IO whole (upstream read none of it): a Socket.IO
        # CONNECT without a key, whose refusal the next poll returns.
        body = b'40{"x":1}'
        answer = raw_request(server.port, post_head(sid, length=None), b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert status_of(answer) == 200, answer
        assert client.get(f"{server.http}/ws/?{EIO}&sid={sid}").text.startswith('44{"message":"missing api key')
        # A body that stops coming: 408 after HTTP_BODY_TIMEOUT_SECONDS, never a request left hanging.
        answer = raw_request(server.port, post_head(sid, length=1000), b"4" * 10)
        assert status_of(answer) == 408
        # A client that leaves mid-body is simply gone; the session still works.
        raw_request(server.port, post_head(sid, length=1000), b"4" * 10, read=False)
        pong = client.post(f"{server.http}/ws/?{EIO}&sid={sid}", content=b"3")
        assert (pong.status_code, pong.text) == (200, "OK")
        # Other paths get the Content-Length check too.
        head = f"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {OVER_LIMIT}\r\n"
        answer = raw_request(server.port, head)
        assert status_of(answer) == 413
        assert metric(server, "replier_edge_refused_total", reason="body_too_large") == 3
        assert metric(server, "replier_edge_refused_total", reason="body_timeout") == 1
    assert "Traceback" not in server.logs()


def test_unauthenticated_sessions_are_capped_and_closed_after_the_deadline(provisioned, configured_db):
    ta = make_tenant()
    with (
        serving(provisioned, MAX_UNAUTHENTICATED="4", AUTH_TIMEOUT_SECONDS="4") as server,
        httpx.Client(timeout=10) as client,
    ):
        # A handshake Engine.IO refuses (wrong protocol version) is not counted.
        assert client.get(f"{server.http}/ws/?EIO=3&transport=polling").status_code == 400
        sockets = [open_websocket(server), open_websocket(server)]
        sids = [open_polling(client, server), open_polling(client, server)]
        refused = polling_handshake(client, server)
        assert refused.status_code == 503 and "waiting to authenticate" in refused.text
        assert refused.headers["retry-after"] == "4"
        assert refused_websocket(server) == 503
        assert health(server)["unauthenticated"] == 4
        assert metric(server, "replier_edge_refused_total", reason="unauthenticated_limit") == 2
        # Nobody authenticated: all four are closed after AUTH_TIMEOUT_SECONDS.
        for ws in sockets:
            assert close_frame(ws) == (1008, "not authenticated in time")
            ws.close()
        wait_until(lambda: health(server)["unauthenticated"] == 0)
        for sid in sids:  # the polling sessions are gone (Engine.IO: unknown session)
            assert client.get(f"{server.http}/ws/?{EIO}&sid={sid}").status_code == 400
        assert metric(server, "replier_edge_refused_total", reason="auth_timeout") == 4
        assert metric(server, "replier_unauthenticated_sessions") == 0
        # Room again: a real client connects and is answered.
        run(_still_answers(server, ta.secret, "cap-1", upgrade=True))
    assert "Traceback" not in server.logs()


async def _polling_client(server, secret: str, transports: tuple | list = ("polling",)):
    """A python-socketio client starting on long-polling (only that by default); (client, inbox)."""
    inbox: asyncio.Queue = asyncio.Queue()
    client = socketio.AsyncClient(reconnection=False)
    client.on("message", inbox.put)
    await client.connect(server.http, socketio_path="ws", transports=list(transports), headers={"x-apikey": secret})
    return client, inbox


def test_authenticated_sessions_stay_and_anonymous_ones_do_not(provisioned, configured_db):
    """Accepted Socket.IO connections (websocket and polling) outlive the deadline; a refused key, a
    Socket.IO disconnect that keeps the Engine.IO session, and a revoked key all fall back under it."""
    ta = make_tenant()
    doomed = make_tenant()
    # Short pings: a polling client's disconnect waits for its pending long poll, which upstream ends only
    # at the next ping or after ping interval + timeout.
    with serving(provisioned, AUTH_TIMEOUT_SECONDS="2", PING_INTERVAL="1", PING_TIMEOUT="2") as server:

        async def scenario():
            sio, inbox = await raw_client(server.http, ta.secret)
            polling, polled = await _polling_client(server, ta.secret)
            # Blocking calls go to a thread: the clients must keep answering the 1 s pings meanwhile.
            bad_key = await asyncio.to_thread(open_websocket, server, ["x-apikey: mtk_not-a-key"])
            assert (await asyncio.to_thread(socketio_connect, bad_key)).startswith("44")  # refused; session stays
            left = await asyncio.to_thread(open_websocket, server, [f"x-apikey: {ta.secret}"])
            assert (await asyncio.to_thread(socketio_connect, left)).startswith("40{")
            left.send("41")  # Socket.IO disconnect, Engine.IO session kept open
            revoked = await asyncio.to_thread(open_websocket, server, [f"x-apikey: {doomed.secret}"])
            assert (await asyncio.to_thread(socketio_connect, revoked)).startswith("40{")
            await asyncio.to_thread(wait_until, lambda: health(server)["connections"] == 3)
            doomed.revoke()  # the revocation check disconnects it; the client ignores that
            for ws in (bad_key, left, revoked):
                assert (await asyncio.to_thread(close_frame, ws))[0] == 1008
                ws.close()
            assert (await asyncio.to_thread(health, server))["unauthenticated"] == 0
            # The accepted ones, over both transports, are still there and still answered.
            for client, box, n in ((sio, inbox, 1), (polling, polled, 2)):
                payload = api_message("still here", message_id=f"stay-{n}", user_id="u-stay").to_dict()
                await client.emit("message", _envelope(f"env-stay-{n}", payload))
                reply = await next_of(box, "sys_std")
                assert reply["payload"]["message_info"]["message_id"] == f"mt-reply:stay-{n}"
            await sio.disconnect()
            await polling.disconnect()

        run(scenario())
        assert metric(server, "replier_edge_refused_total", reason="auth_timeout") == 3
    assert "Traceback" not in server.logs()


def test_connections_per_address_are_limited_whatever_x_forwarded_for_says(provisioned, configured_db):
    ta = make_tenant()
    key = f"x-apikey: {ta.secret}"
    with (
        serving(provisioned, MAX_CONNECTIONS_PER_ADDRESS="3", AUTH_TIMEOUT_SECONDS="30") as server,
        httpx.Client(timeout=10) as client,
    ):
        first = open_websocket(server, [key])
        assert socketio_connect(first).startswith("40{")  # authenticated ones count too
        second = open_websocket(server, ["X-Forwarded-For: 10.0.0.2"])
        open_polling(client, server, **{"X-Forwarded-For": "10.0.0.3"})
        assert refused_websocket(server, [key, "X-Forwarded-For: 10.0.0.4"]) == 429
        refused = polling_handshake(client, server, **{"X-Forwarded-For": "10.0.0.5"})
        assert refused.status_code == 429 and "from this address" in refused.text
        assert metric(server, "replier_edge_refused_total", reason="address_limit") == 2
        second.close()
        wait_until(lambda: health(server)["unauthenticated"] == 1)
        third = open_websocket(server, [key])  # a slot is free again
        assert socketio_connect(third).startswith("40{")
        first.close()
        third.close()
    # Behind a proxy named in FORWARDED_ALLOW_IPS, its X-Forwarded-For is the client address.
    with serving(provisioned, MAX_CONNECTIONS_PER_ADDRESS="1", FORWARDED_ALLOW_IPS="127.0.0.1") as server:
        one = open_websocket(server, ["X-Forwarded-For: 10.0.0.1"])
        other = open_websocket(server, ["X-Forwarded-For: 10.0.0.2"])
        assert refused_websocket(server, ["X-Forwarded-For: 10.0.0.1"]) == 429
        one.close()
        other.close()


MALFORMED_WEBSOCKET_TEXT = ["hello", "", "0", "9", "b!!!", "4", "4hello", "42[bad json", "42", "42[]", "42{}", "43x"]
MALFORMED_WEBSOCKET_BINARY = [b"\x00\x01garbage", b""]
MALFORMED_POLLING = ["hello", "0", "9", "6", "2"]  # refused by the edge (400)
MALFORMED_POLLING_SOCKETIO = ["4", "42[]", '40{"']  # valid Engine.IO, malformed Socket.IO: dropped (200)


def test_malformed_frames_are_counted_in_one_warning_without_tracebacks(provisioned, configured_db):
    """Upstream wrote about 40 ERROR tracebacks for 30 malformed frames (each twice: its own handler
    and the root's), and a websocket text frame that is not Engine.IO escaped as an ASGI exception."""
    ta = make_tenant()
    with serving(provisioned, MALFORMED_LOG_SECONDS="6") as server, httpx.Client(timeout=10) as client:
        sent = 0
        anonymous = open_websocket(server)
        for frame in MALFORMED_WEBSOCKET_TEXT:
            anonymous.send(frame)
            sent += 1
        for frame in MALFORMED_WEBSOCKET_BINARY:
            anonymous.send_binary(frame)
            sent += 1
        anonymous.send('451-["message",{"_placeholder":true,"num":0}]')  # binary event before connecting
        sent += 1
        sid = open_polling(client, server)
        for frame in MALFORMED_POLLING:
            response = client.post(f"{server.http}/ws/?{EIO}&sid={sid}", content=frame.encode())
            assert response.status_code == 400 and response.text == "malformed payload"
            sent += 1
        response = client.post(f"{server.http}/ws/?{EIO}&sid={sid}", content=b"\xff\xfe")
        assert response.status_code == 400
        sent += 1
        for frame in MALFORMED_POLLING_SOCKETIO:
            response = client.post(f"{server.http}/ws/?{EIO}&sid={sid}", content=frame.encode())
            assert (response.status_code, response.text) == (200, "OK")
            sent += 1
        # An authenticated connection: garbage is dropped, the connection keeps working.
        ws = open_websocket(server, [f"x-apikey: {ta.secret}"])
        assert socketio_connect(ws).startswith("40{")
        for frame in ["4", "42", '42{"a":1}', "4hello", '451-["message",{"_placeholder":true,"num":7}]']:
            ws.send(frame)
            sent += 1
        ws.send_binary(b"\x01")  # the attachment that cannot be placed
        ws.send("431[]")  # an ACK nobody asked for: not malformed, ignored upstream
        ws.send('461-2[{"_placeholder":true,"num":0}]')  # the same as a binary ACK
        ws.send_binary(b"\x02")
        # A well-formed binary event (two attachments): handled, and answered with a validation error.
        ws.send('452-["message",{"a":{"_placeholder":true,"num":0},"b":{"_placeholder":true,"num":1}}]')
        ws.send_binary(b"\x03")
        ws.send_binary(b"\x04")
        ws.send("bNDI=")  # base64: a binary message, and b"42" is no Socket.IO packet
        sent += 1
        message = api_message("after the garbage", message_id="mal-1", user_id="u-mal").to_dict()
        ws.send("42" + _json(["message", _envelope("env-mal-1", message)]))
        answers = [ws.recv()]
        while "mt-reply:mal-1" not in answers[-1]:
            answers.append(ws.recv())
        assert answers[0].startswith('42["message",{') and "custom_error" in answers[0], answers
        assert sent == 30
        line = wait_until(
            lambda: re.findall(r"WARNING replier: ignored (\d+) malformed frames? from (\S+)", server.logs())
        )
        assert line == [("30", "127.0.0.1")]
        assert metric(server, "replier_malformed_frames_total") == 30
        assert metric(server, "replier_edge_refused_total", reason="malformed_payload") == 6
        anonymous.close()
        ws.close()
    logs = server.logs()
    assert "Traceback" not in logs
    assert " ERROR " not in logs


def _json(value) -> str:
    import orjson

    return orjson.dumps(value).decode()


def test_websocket_frames_over_the_limit_are_refused_from_their_header(provisioned):
    """uvicorn's ws_max_size is the Engine.IO limit: a frame announcing more is refused (1009) before
    its payload is read. With uvicorn's default of 16 MiB the replier waited for all of it."""
    with serving(provisioned) as server:
        ws = open_websocket(server)
        frame = websocket.ABNF.create_frame("4" + "x" * OVER_LIMIT, websocket.ABNF.OPCODE_TEXT).format()
        ws.sock.sendall(frame[:4096])
        assert close_frame(ws, timeout=10)[0] == 1009
        ws.close()
        wait_until(lambda: health(server)["unauthenticated"] == 0)
