"""The ASGI layer in front of python-engineio: request bodies, handshakes and frames, checked first.

python-engineio 4.15.1 reads a polling POST body itself and, for a declared Content-Length above
`max_http_buffer_size`, raises `ContentTooLongError` and then waits forever in `disconnect`
(`close(wait=True)`, see `replier.outbox.server`): no answer, and the socket and its descriptor kept after
the client left. So before Engine.IO sees a request under the Socket.IO path, this layer:

- answers 413 (and closes the connection) when the declared Content-Length is above the limit, without
  reading the body; a body without Content-Length (chunked) is counted as it arrives and cut at the
  limit with the same 413; a body not complete within `body_timeout` gets 408; a client that leaves
  mid-body gets nothing and Engine.IO never hears of it. Engine.IO then receives the whole body in one
  piece, with a Content-Length that matches it;
- answers 400 to a polling body that is not a payload of client packets, and drops websocket frames
  that are not Engine.IO packets (counted, see `replier.outbox.frames`);
- admits each handshake (a request without `sid`) through the `SessionGuard`: 503 when too many
  sessions are waiting to authenticate, 429 when the client address has too many open sessions (for
  a websocket, the same status through the ASGI websocket.http.response extension, or a close).

Other paths (/health, /metrics) only get the Content-Length check.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs

from replier.outbox.frames import MalformedFrames, polling_payload_problem, websocket_frame_problem
from replier.outbox.server import SESSION_KEY
from replier.sessions import ADDRESS_LIMIT, Session, SessionGuard

log = logging.getLogger("replier")

BODY_TOO_LARGE = "body_too_large"
BODY_TIMEOUT = "body_timeout"
BAD_CONTENT_LENGTH = "bad_content_length"
MALFORMED_PAYLOAD = "malformed_payload"

_REFUSALS = {
    # reason: (HTTP status, message, websocket close code)
    ADDRESS_LIMIT: (429, "too many open connections from this address", 1008),
    "unauthenticated_limit": (503, "too many connections waiting to authenticate; retry shortly", 1013),
}
_INVALID = -1
_BODY_HEADERS = (b"content-length", b"transfer-encoding")


def client_address(scope: dict) -> str:
    """The client's address as uvicorn gives it (a trusted proxy's X-Forwarded-For only if configured)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def _declared_length(scope: dict) -> int | None:
    """The Content-Length header as a number; None when absent, _INVALID when unusable."""
    value = None
    for name, raw in scope.get("headers", ()):
        if name.lower() == b"content-length":
            if value is not None:
                return _INVALID
            value = raw
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return _INVALID
    return length if length >= 0 else _INVALID


def _query(scope: dict) -> dict[str, list[str]]:
    try:
        return parse_qs(scope.get("query_string", b"").decode("utf-8"))
    except UnicodeDecodeError:
        return {}  # as upstream: an undecodable query string counts as empty


async def respond(send, status: int, message: str, headers: list | None = None) -> None:
    """A plain-text answer that also closes the connection (its unread body must not be parsed)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": message.encode()})


class Edge:
    """ASGI middleware around the Socket.IO app (see the module docstring)."""

    def __init__(
        self,
        app,
        *,
        path: str,
        limit: int,
        body_timeout: float,
        guard: SessionGuard,
        malformed: MalformedFrames,
        metrics,
    ) -> None:
        self.app = app
        self.path = "/" + path.strip("/") + "/"
        self.limit = limit
        self.body_timeout = body_timeout
        self.guard = guard
        self.malformed = malformed
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            length = _declared_length(scope)
            if length == _INVALID:
                await self._refuse_http(send, BAD_CONTENT_LENGTH, 400, "invalid Content-Length")
                return
            if length is not None and length > self.limit:
                await self._refuse_http(send, BODY_TOO_LARGE, 413, f"request body over {self.limit} bytes")
                return
            if self._ours(scope):
                await self._polling(scope, receive, send)
                return
        elif kind == "websocket" and self._ours(scope):
            await self._websocket(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ours(self, scope: dict) -> bool:
        path = scope["path"]
        return (path if path.endswith("/") else path + "/").startswith(self.path)

    # -- HTTP long-polling ---------------------------------------------------------------------
    async def _polling(self, scope, receive, send) -> None:
        method = scope.get("method")
        if method == "POST":
            body = await self._read_body(receive, send)
            if body is None:
                return
            problem = polling_payload_problem(body)
            if problem is not None:
                self.malformed.note(client_address(scope), problem)
                await self._refuse_http(send, MALFORMED_PAYLOAD, 400, "malformed payload")
                return
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _BODY_HEADERS]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.app({**scope, "headers": headers}, _replay(body, receive), send)
            return
        if method != "GET" or "sid" in _query(scope):
            await self.app(scope, receive, send)
            return
        session = await self._admit(scope, send)
        if session is None:
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if session.sid is None:  # no Engine.IO session came of it (a bad request)
                self.guard.release(session)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, at most `limit` bytes, within `body_timeout`; None once answered or gone."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    event = await receive()
                    if event["type"] != "http.request":
                        return None  # the client left
                    chunk = event.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await self._refuse_http(send, BODY_TOO_LARGE, 413, f"request body over {self.limit} bytes")
                        return None
                    chunks.append(chunk)
                    if not event.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            await self._refuse_http(send, BODY_TIMEOUT, 408, "request body not received in time")
            return None

    async def _refuse_http(self, send, reason: str, status: int, message: str, headers: list | None = None) -> None:
        self.metrics.edge_refused.labels(reason).inc()
        await respond(send, status, message, headers)

    async def _admit(self, scope, send) -> Session | None:
        admitted = self.guard.admit(client_address(scope))
        if isinstance(admitted, Session):
            scope[SESSION_KEY] = admitted
            return admitted
        status, message, code = _REFUSALS[admitted]
        retry = [(b"retry-after", str(max(1, round(self.guard.auth_timeout))).encode())]
        if scope["type"] == "http":
            await self._refuse_http(send, admitted, status, message, retry)
            return None
        self.metrics.edge_refused.labels(admitted).inc()
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *retry],
                }
            )
            await send({"type": "websocket.http.response.body", "body": message.encode()})
        else:  # pragma: no cover - uvicorn's websocket implementations all offer the extension
            await send({"type": "websocket.close", "code": code, "reason": message})
        return None

    # -- websocket -----------------------------------------------------------------------------
    async def _websocket(self, scope, receive, send) -> None:
        sid = _query(scope).get("sid", [None])[0]
        if sid is None:
            session = await self._admit(scope, send)
            if session is None:
                return
        else:  # a polling session upgrading: the guard knows it already (or Engine.IO refuses the sid)
            session = self.guard.sessions.get(sid)
        address = client_address(scope)
        closed = False

        async def guarded_send(message: dict) -> None:
            nonlocal closed
            if closed:
                return  # after a close, Engine.IO's writer may still try; uvicorn would raise
            if message["type"] in ("websocket.close", "websocket.http.response.body"):
                closed = True
            await send(message)

        async def checked_receive() -> dict:
            while True:
                event = await receive()
                if event["type"] == "websocket.receive":
                    problem = websocket_frame_problem(event)
                    if problem is not None:
                        self.malformed.note(address, problem)
                        continue
                return event

        async def close_transport() -> None:
            await guarded_send({"type": "websocket.close", "code": 1008, "reason": "not authenticated in time"})

        if session is not None:
            session.close_transport = close_transport
        try:
            await self.app(scope, checked_receive, guarded_send)
        finally:
            if sid is None:
                self.guard.release(session)


def _replay(body: bytes, receive):
    """A `receive` that hands over the body read by the edge, then the connection's own events."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
