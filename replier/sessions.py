"""Engine.IO sessions before and after authentication: a cap, a deadline and a per-address limit.

An Engine.IO session (a polling handshake or a websocket) costs a socket object, a queue and, for a
websocket, a file descriptor, before the client has shown any credentials: those come with the
Socket.IO CONNECT packet that follows. Without a bound, 2,000 anonymous handshakes were all accepted.
Here every session is admitted at its handshake (`SessionGuard.admit`, called by `replier.edge`):

- sessions not yet authenticated (Socket.IO connect accepted by `Replier.on_connect`) count toward
  `max_unauthenticated`; a handshake beyond it is refused before Engine.IO allocates anything;
- a session must authenticate within `auth_timeout` seconds or is closed (a refused CONNECT leaves
  the Engine.IO session open: it stays unauthenticated and meets the same deadline);
- all open sessions of one client address, authenticated or not, count toward `max_per_address`.

The address is the one in the ASGI scope: the TCP peer, or what a trusted proxy says when (and only
when) FORWARDED_ALLOW_IPS is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("replier")

UNAUTHENTICATED_LIMIT = "unauthenticated_limit"
ADDRESS_LIMIT = "address_limit"
AUTH_TIMEOUT = "auth_timeout"


@dataclass(slots=True, eq=False)
class Session:
    """One Engine.IO session as the guard counts it; `sid` is known once Engine.IO made the session."""

    address: str
    sid: str | None = None
    authenticated: bool = False
    open: bool = True
    timer: asyncio.TimerHandle | None = None
    # Set by the edge for a websocket: closes the connection itself (an ASGI websocket.close).
    close_transport: Callable[[], Awaitable[None]] | None = None
    # Set by the edge for a websocket: its frame limit follows authentication (see replier.edge).
    set_frame_limit: Callable[[bool], None] | None = None
    tenant_id: str | None = None  # the tenant it authenticated as (set by the gate)


class SessionGuard:
    def __init__(self, *, max_unauthenticated: int, max_per_address: int, auth_timeout: float, metrics=None) -> None:
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.auth_timeout = auth_timeout
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.unauthenticated = 0
        self.per_address: dict[str, int] = {}
        # Closes an Engine.IO session without waiting for its client (set by replier.outbox.server).
        self.close_engine_session: Callable[[str], Awaitable[None]] | None = None
        self._closing: set[asyncio.Task] = set()

    # -- admission ---------------------------------------------------------------------------
    def admit(self, address: str) -> Session | str:
        """A counted session for a handshake from `address`, or the reason it is refused."""
        if self.unauthenticated >= self.max_unauthenticated:
            return UNAUTHENTICATED_LIMIT
        if self.per_address.get(address, 0) >= self.max_per_address:
            return ADDRESS_LIMIT
        session = Session(address)
        self.per_address[address] = self.per_address.get(address, 0) + 1
        self._unauthenticated(+1)
        self._arm(session)
        return session

    def bind(self, session: Session, sid: str) -> None:
        """Engine.IO created the session `sid` for this handshake."""
        if session.open:
            session.sid = sid
            self.sessions[sid] = session

    def address_of(self, sid: str) -> str:
        session = self.sessions.get(sid)
        return session.address if session is not None else "unknown"

    # -- authentication ----------------------------------------------------------------------
    def authenticated(self, sid: str) -> None:
        """The session's Socket.IO connect was accepted: no deadline, no longer counted as anonymous."""
        session = self.sessions.get(sid)
        if session is None or not session.open or session.authenticated:
            return
        session.authenticated = True
        self._unauthenticated(-1)
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if session.set_frame_limit is not None:
            session.set_frame_limit(True)

    def deauthenticated(self, sid: str) -> None:
        """The Socket.IO connection ended but the Engine.IO session stays open: anonymous again."""
        session = self.sessions.get(sid)
        if session is None or not session.open or not session.authenticated:
            return
        session.authenticated = False
        self._unauthenticated(+1)
        self._arm(session)
        if session.set_frame_limit is not None:
            session.set_frame_limit(False)

    # -- release -----------------------------------------------------------------------------
    def release(self, session: Session) -> None:
        """The session is gone (idempotent)."""
        if not session.open:
            return
        session.open = False
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if not session.authenticated:
            self._unauthenticated(-1)
        left = self.per_address.get(session.address, 0) - 1
        if left > 0:
            self.per_address[session.address] = left
        else:
            self.per_address.pop(session.address, None)
        if session.sid is not None and self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]

    def release_sid(self, sid: str) -> None:
        session = self.sessions.get(sid)
        if session is not None:
            self.release(session)

    # -- internals ---------------------------------------------------------------------------
    def _unauthenticated(self, delta: int) -> None:
        self.unauthenticated += delta
        if self.metrics is not None:
            self.metrics.unauthenticated.set(self.unauthenticated)

    def _arm(self, session: Session) -> None:
        session.timer = asyncio.get_running_loop().call_later(self.auth_timeout, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.timer = None
        if not session.open or session.authenticated:
            return
        if self.metrics is not None:
            self.metrics.edge_refused.labels(AUTH_TIMEOUT).inc()
        log.debug("closing a session from %s: not authenticated within %g s", session.address, self.auth_timeout)
        task = asyncio.ensure_future(self._close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, session: Session) -> None:
        try:
            if session.close_transport is not None:
                await session.close_transport()
            if session.sid is not None and self.close_engine_session is not None:
                await self.close_engine_session(session.sid)
        finally:
            self.release(session)
