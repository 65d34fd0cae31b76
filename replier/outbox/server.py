"""python-socketio / python-engineio servers with the session guard wired in and two upstream bugs fixed.

Upstream bug (python-engineio 4.15.1, with python-socketio 5.18.1): `AsyncServer.disconnect(sid)`
awaits `AsyncSocket.close(wait=True)`, which is `queue.join()` on the session's outgoing queue: it
returns only once a client has fetched every queued packet. `handle_request` calls it when a polling
POST fails with an `EngineIOError` (`ContentTooLongError` for a declared Content-Length above
`max_http_buffer_size`, `UnknownPacketError` for an OPEN packet in the body), and that client is not
polling: the request never gets an answer. uvicorn stops reading a request body it has buffered 64 KiB
of, so it never sees the client leave either: each such request kept a socket and its file descriptor
for good (100 requests: 100 fds and 14 MB), until the process ran out of descriptors and refused every
client and /health. `NonBlockingEngineServer.disconnect` closes without waiting (the CLOSE packet stays
queued for a poll that may come); `replier.edge` also refuses oversized and malformed bodies before
Engine.IO sees them.

Upstream keeps every closed session alive for up to `ping_interval` (25 s): the session's next ping is
a task sleeping in `AsyncSocket._send_ping`, which holds the socket, its queues and its events until
it wakes up. Under connection churn (thousands of connects a minute) that is thousands of dead
sessions at any time, and the replier's RSS rose from 95 to 297 MB over four rounds of 5,000 cycles
and stayed there (freed memory is rarely returned to the OS). `NonBlockingEngineServer` remembers each
session's ping task and cancels it when the session closes (`cancel_ping`).

Malformed Socket.IO packets are dropped and counted (`replier.outbox.frames`) instead of raising inside
upstream's dispatch, where each one became an ERROR traceback.
"""

from __future__ import annotations

import asyncio
import logging

import engineio
import socketio
from socketio import packet as sio_packet

from replier.outbox.frames import DECODE_ERRORS, MalformedFrames, socketio_packet_problem
from replier.outbox.serializer import JsonPacket, OrjsonModule
from replier.sessions import SessionGuard

SESSION_KEY = "replier.session"  # the edge's Session for a handshake, in the ASGI scope
NAMESPACE = "/"
_BINARY = (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK)


class NonBlockingEngineServer(engineio.AsyncServer):
    sid_prefix = ""  # INSTANCE_NAME + ".": the balancer routes a session's requests by it (deploy/)

    def generate_id(self) -> str:
        """Upstream's random session id, after this replier's name when it has one.

        Behind a balancer every request of an Engine.IO session (polls, the websocket upgrade) must
        reach the replier that holds it. Clients send the id in every request's `sid` query
        parameter, so the balancer can route on its prefix (deploy/haproxy.cfg.template): sticky
        without cookies (aiohttp, under maim_message, keeps none for IP addresses) and without
        pinning every client of one address (a NAT, or an adapter host) to one replier.
        """
        return self.sid_prefix + super().generate_id()

    def start_background_task(self, target, *args, **kwargs):
        """Upstream's, remembering a session's ping task on the session (see `cancel_ping`)."""
        task = super().start_background_task(target, *args, **kwargs)
        if getattr(target, "__name__", "") == "_send_ping":
            target.__self__.replier_ping_task = task
        return task

    def cancel_ping(self, sid: str) -> None:
        """Cancel the closing session's pending ping, which would keep it in memory for `ping_interval`."""
        socket = self.sockets.get(sid)
        task = getattr(socket, "replier_ping_task", None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            socket.replier_ping_task = None

    async def disconnect(self, sid: str | None = None) -> None:
        """Close one session (or all) without waiting for its client to collect the CLOSE packet."""
        for key in [sid] if sid is not None else list(self.sockets):
            await self.close_session(key)

    async def close_session(self, sid: str) -> None:
        socket = self.sockets.get(sid)
        if socket is None:
            return
        try:
            if not socket.closed and not socket.closing:
                await socket.close(wait=False, abort=False, reason=self.reason.SERVER_DISCONNECT)
        finally:
            self.sockets.pop(sid, None)
            socket.queue.put_nowait(None)  # ends a websocket's writer and a pending poll after the CLOSE


class InlineSend:
    """A client manager's `emit`, sending to a lone recipient connected to this process without a task.

    Upstream's `AsyncManager.emit` (5.18.1) creates a task per recipient and waits for them: 12 us per
    `emit(..., to=sid)` against 1.7 us for the same send inline (measured in-process), about 10% of the
    replier's throughput at 50 clients, since every message costs an ack and a reply. With a single
    recipient and no callback there is nothing to run concurrently: the packet is encoded by the
    server's packet class, as upstream does, and handed to Engine.IO's public `send`. Anything else
    (several recipients, callbacks, binary packets) takes upstream's path.
    """

    async def emit(self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None, **kwargs):
        room = to or room
        if callback is None and skip_sid is None and isinstance(room, str):
            recipients = list(self.get_participants(namespace, room))
            if len(recipients) == 1:
                args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
                encoded = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args]).encode()
                if isinstance(encoded, str):
                    await self.server.eio.send(recipients[0][1], encoded)
                    return
        await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs)


class InlineManager(InlineSend, socketio.AsyncManager):
    """python-socketio's in-memory client manager with the inline send: one process (no REDIS_URL)."""


class RedisManager(InlineSend, socketio.AsyncRedisManager):
    """python-socketio's Redis manager (REDIS_URL) with the inline send.

    Every replier's Socket.IO sids are its own (a client's session lives on the instance the balancer
    pinned it to), and the outbox sends to one sid at a time: a sid connected here is sent to inline,
    without the round trip through Redis that upstream's `AsyncPubSubManager.emit` makes for every
    emit. An emit to a sid or room this process does not hold, and every disconnect of a sid held
    elsewhere, goes through Redis to the other instances, as upstream does.
    """


class GuardedServer(socketio.AsyncServer):
    """Tells the `SessionGuard` when Engine.IO sessions open, authenticate and close."""

    def __init__(self, *, guard: SessionGuard, malformed: MalformedFrames, **kwargs) -> None:
        self.guard = guard
        self.malformed = malformed
        super().__init__(**kwargs)
        guard.close_engine_session = self.eio.close_session

    def _engineio_server_class(self):
        return NonBlockingEngineServer

    async def _handle_eio_connect(self, eio_sid, environ):
        session = environ.get("asgi.scope", {}).get(SESSION_KEY)
        if session is not None:
            self.guard.bind(session, eio_sid)
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handle_eio_disconnect(self, eio_sid, reason):
        try:
            self.eio.cancel_ping(eio_sid)
            await super()._handle_eio_disconnect(eio_sid, reason)
        finally:
            self.guard.release_sid(eio_sid)

    async def _handle_connect(self, eio_sid, namespace, data):
        await super()._handle_connect(eio_sid, namespace, data)
        if not self._connected(eio_sid):
            return
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            # The session ended while the connect handler awaited the key lookup (the client left, or
            # the deadline passed): upstream skips the disconnect of a connection still pending, and
            # would then register it as connected for good.
            await super()._handle_disconnect(eio_sid, namespace, self.reason.CLIENT_DISCONNECT)
            return
        self.guard.authenticated(eio_sid)

    async def _handle_disconnect(self, eio_sid, namespace, reason=None):
        await super()._handle_disconnect(eio_sid, namespace, reason)
        self._maybe_anonymous(eio_sid)

    async def disconnect(self, sid, namespace=None, ignore_queue=False):
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace or NAMESPACE)
        await super().disconnect(sid, namespace, ignore_queue)
        if eio_sid is not None:
            self._maybe_anonymous(eio_sid)

    def _connected(self, eio_sid: str) -> bool:
        sid = self.manager.sid_from_eio_sid(eio_sid, NAMESPACE)
        return sid is not None and self.manager.is_connected(sid, NAMESPACE)

    def _maybe_anonymous(self, eio_sid: str) -> None:
        """A Socket.IO disconnect that leaves the Engine.IO session open puts it back under the deadline."""
        socket = self.eio.sockets.get(eio_sid)
        if socket is not None and not socket.closing and not socket.closed and not self._connected(eio_sid):
            self.guard.deauthenticated(eio_sid)

    async def _handle_eio_message(self, eio_sid, data):
        """Upstream's dispatch (python-socketio 5.18.1), with decoding separated from handling.

        Errors while decoding are the client's: counted and dropped. Errors in the handlers are ours
        and still reach upstream's logging.
        """
        pending = self._binary_packet.get(eio_sid)
        try:
            if pending is not None:
                if not pending.add_attachment(data):
                    return
                del self._binary_packet[eio_sid]
                pkt = pending
            else:
                pkt = self.packet_class(encoded_packet=data)
            problem = socketio_packet_problem(pkt)
        except DECODE_ERRORS:
            problem = "undecodable Socket.IO packet"
        if (
            problem is None
            and pending is None
            and pkt.packet_type in _BINARY
            and not self.manager.sid_from_eio_sid(eio_sid, pkt.namespace or NAMESPACE)
        ):
            problem = "Socket.IO binary packet before connecting"
        if problem is not None:
            self._binary_packet.pop(eio_sid, None)
            self.malformed.note(self.guard.address_of(eio_sid), problem)
            return
        kind = pkt.packet_type
        if pending is not None:
            if kind == sio_packet.BINARY_EVENT:
                await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
            else:
                await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == sio_packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == sio_packet.EVENT:
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == sio_packet.ACK:
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)
        else:  # BINARY_EVENT or BINARY_ACK: wait for its attachments
            self._binary_packet[eio_sid] = pkt


def _library_logger(name: str) -> logging.Logger:
    """The library's logger at ERROR, without the extra stream handler it adds when given `False`
    (which printed every traceback twice: once there, once through the root handler)."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    return logger


def build_server(
    *,
    guard: SessionGuard,
    malformed: MalformedFrames,
    ping_interval: float,
    ping_timeout: float,
    max_http_buffer_size: int,
    redis_url: str = "",
    redis_channel: str = "socketio",
    instance_name: str = "",
) -> GuardedServer:
    """The replier's Socket.IO server (ASGI mode, orjson packets); with `redis_url`, its client
    manager is python-socketio's Redis manager on `redis_channel` (several repliers, one deployment)."""
    manager = (
        RedisManager(redis_url, channel=redis_channel, logger=_library_logger("socketio.server"))
        if redis_url
        else InlineManager()
    )
    server = GuardedServer(
        guard=guard,
        malformed=malformed,
        client_manager=manager,
        async_mode="asgi",
        async_handlers=False,  # handlers only parse and enqueue; order per connection is kept
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        max_http_buffer_size=max_http_buffer_size,
        logger=_library_logger("socketio.server"),
        engineio_logger=_library_logger("engineio.server"),
        serializer=JsonPacket,
        json=OrjsonModule,
    )
    if instance_name:
        server.eio.sid_prefix = instance_name + "."
    return server


def mount(sio: socketio.AsyncServer, other_app, path: str):
    """The ASGI app serving Socket.IO at `/path` and `other_app` everywhere else."""
    return socketio.ASGIApp(sio, other_asgi_app=other_app, socketio_path=path)
