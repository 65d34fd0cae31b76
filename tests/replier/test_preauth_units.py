"""The pre-authentication pieces on their own: frame checks, the malformed-frame log, the session guard's
bookkeeping and the Content-Length parsing (the wire tests are in test_preauth.py)."""

from __future__ import annotations

import asyncio
import logging

import engineio
import pytest
from engineio.async_socket import AsyncSocket

from replier.edge import _INVALID, _declared_length, _query, client_address
from replier.metrics import Metrics
from replier.outbox import frames
from replier.outbox.frames import (
    MalformedFrames,
    polling_payload_problem,
    socketio_packet_problem,
    websocket_frame_problem,
)
from replier.outbox.serializer import JsonPacket
from replier.outbox.server import SESSION_KEY, GuardedServer, NonBlockingEngineServer
from replier.sessions import ADDRESS_LIMIT, UNAUTHENTICATED_LIMIT, Session, SessionGuard


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ({"text": "42[]"}, None),
        ({"text": "2probe"}, None),
        ({"bytes": b"\x00"}, None),
        ({"text": "bNDI="}, None),
        ({"text": ""}, "empty Engine.IO packet"),
        ({"text": "0{}"}, "unknown Engine.IO packet type"),
        ({"text": "7"}, "unknown Engine.IO packet type"),
        ({"text": "\u0663"}, "unknown Engine.IO packet type"),  # a digit to int(), not to Engine.IO
        ({"text": "b\u00e9"}, "invalid base64 Engine.IO packet"),
        ({"text": "bQQ"}, "invalid base64 Engine.IO packet"),
    ],
)
def test_websocket_frames(event, problem):
    assert websocket_frame_problem({"type": "websocket.receive", **event}) == problem


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", None),
        (b'42["message",{}]\x1e3', None),
        (b"1", None),
        (b"\xff", "undecodable polling payload"),
        (b"d=", "undecodable polling payload"),
        (b"4\x1e" * 17, "undecodable polling payload"),  # more packets than upstream decodes
        (b"0", "unexpected Engine.IO packet type"),
        (b"6", "unexpected Engine.IO packet type"),
    ],
)
def test_polling_payloads(body, problem):
    assert polling_payload_problem(body) == problem


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [
        ('2["message",{}]', None),
        ("0", None),
        ("1", None),
        ("31[]", None),
        ('51-["message",{"_placeholder":true,"num":0}]', None),
        ("2", "Socket.IO event without a name"),
        ("2[]", "Socket.IO event without a name"),
        ("2[1]", "Socket.IO event without a name"),
        ('4{"message":"x"}', "unexpected Socket.IO packet type"),
        ("9", "unexpected Socket.IO packet type"),
        ('5["message"]', "Socket.IO binary packet without attachments"),
        ("6[]", "Socket.IO binary packet without attachments"),
    ],
)
def test_socketio_packets(encoded, problem):
    assert socketio_packet_problem(JsonPacket(encoded_packet=encoded)) == problem


def test_malformed_frames_are_summed_per_address_and_interval(caplog):
    metrics = Metrics()

    async def scenario():
        log = MalformedFrames(0.05, metrics.malformed_frames)
        for _ in range(3):
            log.note("10.0.0.1", "first reason")
        log.note("10.0.0.2", "other reason")
        await asyncio.sleep(0.2)  # the interval ends: one line per address
        log.note("10.0.0.1", "later")
        log.flush()  # as at shutdown
        log.flush()  # nothing left: no line

    with caplog.at_level(logging.WARNING, logger="replier"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "ignored 3 malformed frames from 10.0.0.1 in the last 0.05 s (first: first reason)",
        "ignored 1 malformed frame from 10.0.0.2 in the last 0.05 s (first: other reason)",
        "ignored 1 malformed frame from 10.0.0.1 in the last 0.05 s (first: later)",
    ]
    assert metrics.registry.get_sample_value("replier_malformed_frames_total") == 5


def test_malformed_frames_from_too_many_addresses_share_a_line(caplog, monkeypatch):
    monkeypatch.setattr(frames, "_MAX_ADDRESSES", 2)

    async def scenario():
        log = MalformedFrames(60)
        for address in ("a", "b", "c", "d", "a"):
            log.note(address, "x")
        log.flush()

    with caplog.at_level(logging.WARNING, logger="replier"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("ignored 2 malformed frames from a ")
    assert lines[2].startswith("ignored 2 malformed frames from other addresses ")


def test_the_guard_counts_caps_and_releases():
    metrics = Metrics()

    async def scenario():
        guard = SessionGuard(max_unauthenticated=3, max_per_address=2, auth_timeout=60, metrics=metrics)
        one = guard.admit("10.0.0.1")
        two = guard.admit("10.0.0.1")
        assert isinstance(one, Session) and isinstance(two, Session)
        assert guard.admit("10.0.0.1") == ADDRESS_LIMIT
        three = guard.admit("10.0.0.2")
        assert guard.admit("10.0.0.3") == UNAUTHENTICATED_LIMIT
        guard.bind(one, "sid-1")
        guard.bind(two, "sid-2")
        guard.authenticated("sid-1")
        guard.authenticated("sid-1")  # twice: counted once
        guard.authenticated("unknown")
        assert (guard.unauthenticated, one.timer) == (2, None)
        assert guard.address_of("sid-1") == "10.0.0.1" and guard.address_of("nope") == "unknown"
        assert isinstance(guard.admit("10.0.0.3"), Session)  # room again for an anonymous one
        guard.deauthenticated("sid-1")
        guard.deauthenticated("sid-1")
        guard.deauthenticated("sid-2")  # never authenticated: nothing changes
        assert guard.unauthenticated == 4 and one.timer is not None
        guard.release(one)
        guard.release(one)  # idempotent
        guard.release_sid("sid-2")
        guard.release_sid("sid-2")
        guard.release(three)
        assert guard.per_address == {"10.0.0.3": 1} and guard.sessions == {}
        guard.bind(one, "late")  # a released session is not bound again
        assert "late" not in guard.sessions
        return guard.unauthenticated

    assert asyncio.run(scenario()) == 1
    assert metrics.registry.get_sample_value("replier_unauthenticated_sessions") == 1


def test_the_guard_closes_sessions_that_miss_the_deadline():
    metrics = Metrics()
    closed: list[str] = []

    async def scenario():
        guard = SessionGuard(max_unauthenticated=5, max_per_address=5, auth_timeout=0.05, metrics=metrics)

        async def close_engine_session(sid: str) -> None:
            closed.append(sid)

        guard.close_engine_session = close_engine_session
        late = guard.admit("a")
        guard.bind(late, "late")
        transport: list[bool] = []

        async def close_transport() -> None:
            transport.append(True)

        late.close_transport = close_transport
        prompt = guard.admit("a")
        guard.bind(prompt, "prompt")
        guard.authenticated("prompt")
        unbound = guard.admit("b")  # never bound to an Engine.IO session: released all the same
        for _ in range(100):
            if guard.unauthenticated == 0:
                break
            await asyncio.sleep(0.02)
        guard._expire(prompt)  # a timer firing late for an authenticated session does nothing
        return guard, transport, unbound

    guard, transport, unbound = asyncio.run(scenario())
    assert closed == ["late"] and transport == [True]
    assert not unbound.open
    assert guard.unauthenticated == 0 and guard.per_address == {"a": 1}
    assert metrics.registry.get_sample_value("replier_edge_refused_total", {"reason": "auth_timeout"}) == 2


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([], None),
        ([(b"content-length", b"12")], 12),
        ([(b"Content-Length", b"0")], 0),
        ([(b"content-length", b"12"), (b"content-length", b"12")], _INVALID),
        ([(b"content-length", b"twelve")], _INVALID),
        ([(b"content-length", b"-1")], _INVALID),
    ],
)
def test_declared_length(headers, length):
    assert _declared_length({"headers": headers}) == length


def test_client_address():
    assert client_address({"client": ("10.1.2.3", 4567)}) == "10.1.2.3"
    assert client_address({"client": None}) == "unknown"  # e.g. a unix socket
    assert client_address({}) == "unknown"


def test_a_query_string_that_is_not_utf8_counts_as_empty():
    """As upstream reads it (so such a handshake is refused by Engine.IO, not admitted twice)."""
    assert _query({"query_string": b"EIO=4&sid=abc"}) == {"EIO": ["4"], "sid": ["abc"]}
    assert _query({"query_string": b"EIO=4&\xff"}) == {}


async def _disconnect_idle_polling_session(server) -> None:
    """A polling session whose client stopped polling, disconnected by the server (within 2 s)."""
    socket = AsyncSocket(server, "idle")
    socket.connected = True
    server.sockets["idle"] = socket
    await asyncio.wait_for(server.disconnect("idle"), 2)


def test_upstream_disconnect_waits_for_a_client_that_stopped_polling():
    """The upstream bug (python-engineio 4.15.1): `close(wait=True)` joins the outgoing queue."""
    with pytest.raises(TimeoutError):
        asyncio.run(_disconnect_idle_polling_session(engineio.AsyncServer(async_mode="asgi")))


def test_the_replier_engine_disconnects_without_waiting():
    async def scenario():
        server = NonBlockingEngineServer(async_mode="asgi")
        reasons: list = []
        server.on("disconnect", lambda sid, reason: reasons.append((sid, reason)))
        await _disconnect_idle_polling_session(server)
        gone = AsyncSocket(server, "gone")
        gone.closed = True
        server.sockets["gone"] = gone
        await server.close_session("gone")  # already closed: only removed
        await server.close_session("unknown")
        server.sockets["a"] = AsyncSocket(server, "a")
        await server.disconnect()  # all of them
        return server, reasons

    server, reasons = asyncio.run(scenario())
    assert server.sockets == {}
    assert [sid for sid, _ in reasons] == ["idle", "a"]


def test_a_session_closed_while_its_connect_handler_waits_is_not_left_connected():
    """The deadline (or the client leaving) can end a session while `on_connect` awaits the database."""

    async def scenario():
        guard = SessionGuard(max_unauthenticated=5, max_per_address=5, auth_timeout=60)
        sio = GuardedServer(guard=guard, malformed=MalformedFrames(60), async_mode="asgi")
        lookup = asyncio.Event()
        events: list[str] = []

        async def on_connect(sid, environ, auth=None):
            await lookup.wait()  # the key lookup
            events.append("connect")

        async def on_disconnect(sid, reason=None):
            events.append("disconnect")

        sio.on("connect", on_connect)
        sio.on("disconnect", on_disconnect)
        for eio_sid in ("slow", "fine"):
            session = guard.admit("10.0.0.1")
            sio.eio.sockets[eio_sid] = AsyncSocket(sio.eio, eio_sid)
            await sio._handle_eio_connect(eio_sid, {"asgi.scope": {SESSION_KEY: session}})
        slow = asyncio.create_task(sio._handle_eio_message("slow", "0"))
        fine = asyncio.create_task(sio._handle_eio_message("fine", "0"))
        await asyncio.sleep(0.01)
        await sio.eio.close_session("slow")  # while its lookup is pending
        lookup.set()
        await asyncio.gather(slow, fine)
        return sio, guard, events

    sio, guard, events = asyncio.run(scenario())
    assert sorted(events) == ["connect", "connect", "disconnect"]  # the slow one is disconnected at once
    assert sio.manager.sid_from_eio_sid("slow", "/") is None
    assert sio.manager.sid_from_eio_sid("fine", "/") is not None
    assert guard.unauthenticated == 0 and list(guard.sessions) == ["fine"]


def test_a_closed_sessions_pending_ping_is_cancelled():
    """python-engineio's ping task sleeps `ping_interval` (25 s) holding its session, closed or not:
    under connection churn every session of the last 25 s stayed in memory (perf/churn.py)."""

    async def scenario():
        guard = SessionGuard(max_unauthenticated=5, max_per_address=5, auth_timeout=60)
        sio = GuardedServer(guard=guard, malformed=MalformedFrames(60), async_mode="asgi")
        session = guard.admit("10.0.0.1")
        socket = AsyncSocket(sio.eio, "churned")
        socket.connected = True
        sio.eio.sockets["churned"] = socket
        await sio._handle_eio_connect("churned", {"asgi.scope": {SESSION_KEY: session}})
        ping = sio.eio.start_background_task(socket._send_ping)  # as Engine.IO starts it after the handshake
        await asyncio.sleep(0)
        await sio.eio.close_session("churned")
        await asyncio.sleep(0)
        pending = not ping.done()
        ping.cancel()
        await asyncio.gather(ping, return_exceptions=True)
        return pending, sio, guard

    pending, sio, guard = asyncio.run(scenario())
    assert not pending, "the closed session's ping task still holds it"
    assert sio.eio.sockets == {} and list(guard.sessions) == []
