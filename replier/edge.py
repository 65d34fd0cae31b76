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

Two sizes: `limit` before authentication (and on every other path), `media_limit` for a session whose
Socket.IO connect was accepted (a message with inline images, up to MAX_MEDIA_BYTES). A polling POST
gets the limit of its session; a websocket's frame limit is uvicorn's (`ws_max_size`, set to
`media_limit`) lowered to `limit` on the connection itself until it authenticates (`FrameLimit`: the
websockets-sansio implementation reads its `max_message_size` before each frame, so a frame announcing
more is refused from its header, 1009). Memory: uvicorn reads one websocket message per connection
and pauses until the app takes it, and a polling body is read here; bodies over `limit` take one of
their tenant's `max_large_per_tenant` slots (`LargeBodies`) while they are read and processed, so one
tenant's many large messages wait for each other instead of all being decoded at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
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


class LargeBodies:
    """Per tenant, how many bodies over the pre-auth limit are being read or processed at once.

    A tenant beyond `per_tenant` waits (its websocket is not read meanwhile, its polling body stays
    unread in the socket): one tenant's large messages queue behind each other and never take
    another tenant's turn. Slots are per tenant only, so there is no shared pool to exhaust."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        semaphore = self._slots.get(tenant_id)
        if semaphore is None:
            semaphore = self._slots[tenant_id] = asyncio.Semaphore(self.per_tenant)
        self._users[tenant_id] = self._users.get(tenant_id, 0) + 1
        try:
            async with semaphore:
                yield
        finally:
            left = self._users[tenant_id] - 1
            if left:
                self._users[tenant_id] = left
            else:  # nobody holds or waits: forget the tenant
                del self._users[tenant_id]
                del self._slots[tenant_id]

    def in_use(self, tenant_id: str) -> int:
        """Slots held or awaited by the tenant (for tests and /health)."""
        return self._users.get(tenant_id, 0)


def frame_limit_setter(receive, small: int, large: int) -> Callable[[bool], None] | None:
    """A function setting a websocket's own frame limit (`large` once authenticated), or None when the
    ASGI server's websocket is not uvicorn's websockets-sansio one (then `ws_max_size` alone applies).

    uvicorn hands the app the protocol's bound `receive`; its `conn` is the `websockets` ServerProtocol,
    which reads `max_message_size` for every new frame."""
    conn = getattr(getattr(receive, "__self__", None), "conn", None)
    if conn is None or not isinstance(getattr(conn, "max_message_size", None), int):
        return None

    def set_limit(authenticated: bool) -> None:
        conn.max_message_size = large if authenticated else small

    return set_limit


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
        media_limit: int | None = None,
        large_per_tenant: int = 4,
    ) -> None:
        self.app = app
        self.path = "/" + path.strip("/") + "/"
        self.limit = limit
        self.media_limit = max(limit, media_limit or limit)
        self.body_timeout = body_timeout
        self.guard = guard
        self.malformed = malformed
        self.metrics = metrics
        self.large = LargeBodies(large_per_tenant)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            length = _declared_length(scope)
            if length == _INVALID:
                await self._refuse_http(send, BAD_CONTENT_LENGTH, 400, "invalid Content-Length")
                return
            ours = self._ours(scope)
            limit = self._body_limit(scope) if ours else self.limit
            if length is not None and length > limit:
                self._log_large(scope, length, limit)
                await self._refuse_http(send, BODY_TOO_LARGE, 413, f"request body over {limit} bytes")
                return
            if ours:
                await self._polling(scope, receive, send, limit)
                return
        elif kind == "websocket" and self._ours(scope):
            await self._websocket(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ours(self, scope: dict) -> bool:
        path = scope["path"]
        return (path if path.endswith("/") else path + "/").startswith(self.path)

    def _session_of(self, scope: dict) -> Session | None:
        sid = _query(scope).get("sid", [None])[0]
        return self.guard.sessions.get(sid) if sid is not None else None

    def _body_limit(self, scope: dict) -> int:
        """`media_limit` for a POST to an authenticated session, else `limit`."""
        if scope.get("method") != "POST":
            return self.limit
        session = self._session_of(scope)
        return self.media_limit if session is not None and session.authenticated else self.limit

    def _log_large(self, scope: dict, size: int, limit: int) -> None:
        """An authenticated client's body over the limit is logged (its connection then ends)."""
        if limit == self.media_limit and limit > self.limit:
            log.warning(
                "refused a %d-byte request from %s: over the %d-byte message limit (MAX_MEDIA_BYTES)",
                size,
                client_address(scope),
                limit,
            )

    # -- HTTP long-polling ---------------------------------------------------------------------
    async def _polling(self, scope, receive, send, limit: int | None = None) -> None:
        method = scope.get("method")
        if method == "POST":
            limit = limit or self.limit
            session = self._session_of(scope)
            tenant = session.tenant_id if session is not None and limit > self.limit else None
            if tenant is not None and (_declared_length(scope) or limit) > self.limit:
                async with self.large.slot(tenant):
                    await self._post(scope, receive, send, limit)
                return
            await self._post(scope, receive, send, limit)
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

    async def _post(self, scope, receive, send, limit: int) -> None:
        """A polling POST: the whole body read here (at most `limit`), checked, then handed to Engine.IO."""
        body = await self._read_body(receive, send, limit, scope)
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

    async def _read_body(self, receive, send, limit: int | None = None, scope: dict | None = None) -> bytes | None:
        """The whole body, at most `limit` bytes, within `body_timeout`; None once answered or gone."""
        limit = limit or self.limit
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
                    if size > limit:
                        if scope is not None:
                            self._log_large(scope, size, limit)
                        await self._refuse_http(send, BODY_TOO_LARGE, 413, f"request body over {limit} bytes")
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
        set_limit = frame_limit_setter(receive, self.limit, self.media_limit)
        if set_limit is not None:
            set_limit(session is not None and session.authenticated)
            if session is not None:
                session.set_frame_limit = set_limit
        held: contextlib.AbstractAsyncContextManager | None = None

        async def guarded_send(message: dict) -> None:
            nonlocal closed
            if closed:
                return  # after a close, Engine.IO's writer may still try; uvicorn would raise
            if message["type"] in ("websocket.close", "websocket.http.response.body"):
                closed = True
            await send(message)

        async def checked_receive() -> dict:
            nonlocal held
            if held is not None:  # Engine.IO has processed the large message it was handed last
                slot, held = held, None
                await slot.__aexit__(None, None, None)
            while True:
                event = await receive()
                if event["type"] == "websocket.receive":
                    problem = websocket_frame_problem(event)
                    if problem is not None:
                        self.malformed.note(address, problem)
                        continue
                    tenant = session.tenant_id if session is not None else None
                    if tenant is not None and _frame_size(event) > self.limit:
                        slot = self.large.slot(tenant)
                        await slot.__aenter__()
                        held = slot
                elif event["type"] == "websocket.disconnect" and event.get("code") == 1009:
                    # uvicorn refused a frame over the limit (from its header): say so, never silently
                    log.warning(
                        "closed a websocket from %s: a frame over the %d-byte limit (%s; MAX_MEDIA_BYTES)",
                        address,
                        self.media_limit if session is not None and session.authenticated else self.limit,
                        "authenticated" if session is not None and session.authenticated else "not authenticated",
                    )
                return event

        async def close_transport() -> None:
            await guarded_send({"type": "websocket.close", "code": 1008, "reason": "not authenticated in time"})

        if session is not None:
            session.close_transport = close_transport
        try:
            await self.app(scope, checked_receive, guarded_send)
        finally:
            if held is not None:
                await held.__aexit__(None, None, None)
            if session is not None:
                session.set_frame_limit = None
            if sid is None:
                self.guard.release(session)


def _frame_size(event: dict) -> int:
    data = event.get("text")
    return len(data) if data is not None else len(event.get("bytes") or b"")


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
