"""The `Outbox`: every message to a client and every disconnect, through python-socketio's public API.

One way of sending: `AsyncServer.emit("message", data, to=sid)` (the replier's server sends to a lone
recipient without upstream's per-recipient task: `InlineManager` in `replier.outbox.server`, which keeps
this path as fast as the Engine.IO send it replaced). The outbox also builds the
protocol's messages (acks, replies, errors) for the connection's protocol, and counts what leaves:
`messages_out` for replies, `messages_rejected{code}` for errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import socketio

from isolation.logthrottle import ThrottledLog
from replier.connections import Connection
from replier.metrics import Metrics
from replier.protocol import (
    API,
    Inbound,
    Route,
    build_ack,
    build_api_error,
    build_api_reply,
    build_legacy_error,
    build_legacy_reply,
)

# python-socketio's way for a connect handler to refuse: raise this (its message reaches the client).
Refused = socketio.exceptions.ConnectionRefusedError

EVENT = "message"
REJECTION_LOG_SECONDS = 10.0  # one INFO line per (code, connection) per interval, with a count

log = logging.getLogger("replier")


class Outbox:
    def __init__(self, sio: socketio.AsyncServer, metrics: Metrics) -> None:
        self._sio = sio
        self._metrics = metrics
        self._rejections = ThrottledLog(log, REJECTION_LOG_SECONDS)

    def listen(
        self,
        *,
        connect: Callable[..., Awaitable[None]],
        disconnect: Callable[..., Awaitable[None]],
        message: Callable[[str, Any], Awaitable[None]],
    ) -> None:
        """Route the server's connect, disconnect and "message" events to the replier's handlers."""
        self._sio.on("connect", connect)
        self._sio.on("disconnect", disconnect)
        self._sio.on(EVENT, message)

    @staticmethod
    def refuse(reason: str) -> NoReturn:
        """Refuse the connection being made (only from the connect handler)."""
        raise Refused(reason)

    async def send(self, sid: str, data: dict) -> None:
        """One "message" event to one connection (nothing happens if it is gone)."""
        await self._sio.emit(EVENT, data, to=sid)

    async def ack(self, conn: Connection, msg_id: str) -> None:
        await self.send(conn.sid, build_ack(msg_id, conn.connection_id))

    async def error(
        self,
        conn: Connection,
        code: str,
        message: str,
        *,
        msg_id: str | None = None,
        message_id: str | None = None,
        platform: str | None = None,
        route: Route | None = None,
        retryable: bool = False,
        details: dict | None = None,
    ) -> None:
        """An error in the connection's protocol, counted and logged (throttled) as a rejected message.

        `route` is the chat of the message it is about (its group_info/user_info go with the error, so
        an adapter posts it in that chat); `details` go into the error (e.g. a limit's `retry_after`)."""
        self._metrics.rejected.labels(code).inc()
        self._rejections.log(
            code,
            conn.connection_id,
            "rejected message on connection %s: %s %s (platform %s, key id %s)",
            conn.connection_id,
            code,
            message[:200],
            (route.platform if route else None) or platform or conn.platform or "-",
            conn.key_id,
        )
        if conn.protocol == API:
            data = build_api_error(
                code, message, msg_id=msg_id, message_id=message_id, route=route, retryable=retryable, details=details
            )
        else:
            data = build_legacy_error(
                code,
                message,
                platform=platform,
                message_id=message_id,
                route=route,
                retryable=retryable,
                details=details,
            )
        await self.send(conn.sid, data)

    async def reply_error(
        self,
        conn: Connection,
        inbound: Inbound,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        details: dict | None = None,
    ) -> None:
        """An error about an accepted message (it names the message and its chat in either protocol)."""
        await self.error(
            conn,
            code,
            message,
            msg_id=inbound.msg_id,
            message_id=inbound.message_id,
            platform=inbound.platform,
            route=inbound.route,
            retryable=retryable,
            details=details,
        )

    async def reply(
        self, conns: list[Connection], inbound: Inbound, *, reply_id: str, text: str, agent_name: str, metadata: dict
    ) -> int:
        """The reply to `inbound`, to each of `conns` in its protocol; returns how many were sent."""
        for conn in conns:
            if conn.protocol == API:
                data = build_api_reply(
                    inbound,
                    reply_id=reply_id,
                    text=text,
                    api_key=conn.api_key,
                    agent_name=agent_name,
                    metadata=metadata,
                )
            else:
                data = build_legacy_reply(
                    inbound, reply_id=reply_id, text=text, agent_name=agent_name, metadata=metadata
                )
            await self.send(conn.sid, data)
        if conns:
            self._metrics.messages_out.inc(len(conns))
        return len(conns)

    async def close(self, conn: Connection, code: str | None = None, message: str = "") -> None:
        """Disconnect `conn`, telling it `code` first in its protocol (a legacy client gets a MessageBase
        whose text states it, as for any error)."""
        if code is not None:
            if conn.protocol == API:
                data = build_api_error(code, message)
            else:
                data = build_legacy_error(code, message, platform=conn.platform)
            await self.send(conn.sid, data)
        await self._sio.disconnect(conn.sid)

    async def close_all(self, sids: list[str]) -> None:
        await asyncio.gather(*(self._sio.disconnect(sid) for sid in sids), return_exceptions=True)
