"""The ASGI application: Starlette routes (/health, /metrics) with python-socketio mounted at /ws,
behind `replier.edge` (body limits, handshake admission, frame checks)."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from isolation import db as isolation_db
from isolation.health import HealthProbe
from isolation.migrate import check_schema, describe
from isolation.signals import socketio_channel
from replier.core.config import ReplierSettings, get_settings
from replier.edge import Edge
from replier.keyless import KeylessListener
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.outbox.frames import MalformedFrames
from replier.outbox.server import build_server, mount
from replier.service import Replier
from replier.sessions import SessionGuard
from replier.store import Store

log = logging.getLogger("replier")

SOCKETIO_PATH = "ws"


def http_buffer_limit(settings: ReplierSettings) -> int:
    """The largest polling body or websocket frame accepted before authentication."""
    return max(1_000_000, settings.max_payload_bytes * 4)


def media_buffer_limit(settings: ReplierSettings) -> int:
    """The largest polling body or websocket frame of an authenticated session (Engine.IO's
    `max_http_buffer_size`, uvicorn's `ws_max_size`): the largest message (`max_message_bytes`, room for
    inline media) plus Engine.IO/Socket.IO framing."""
    return max(http_buffer_limit(settings), settings.max_message_bytes + 64 * 1024)


@dataclass(frozen=True, slots=True)
class ReplierApp:
    """What `create_app` builds: the ASGI app to serve, and the replier and settings behind it
    (the server drains the replier before uvicorn closes connections, see `replier.__main__`)."""

    asgi: Edge
    replier: Replier
    settings: ReplierSettings

    async def __call__(self, scope, receive, send) -> None:
        await self.asgi(scope, receive, send)


def create_app(settings: ReplierSettings | None = None, keyless: KeylessListener | None = None) -> ReplierApp:
    """Build the app. The database is configured and checked in the lifespan (at start-up).
    `keyless`: the bound keyless listener (replier.keyless), if the operator turned it on."""
    settings = settings or get_settings()
    metrics = Metrics()
    guard = SessionGuard(
        max_unauthenticated=settings.max_unauthenticated,
        max_per_address=settings.max_connections_per_address,
        auth_timeout=settings.auth_timeout_seconds,
        metrics=metrics,
    )
    malformed = MalformedFrames(settings.malformed_log_seconds, metrics.malformed_frames)
    sio = build_server(
        guard=guard,
        malformed=malformed,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_http_buffer_size=media_buffer_limit(settings),
        redis_url=settings.redis_url,
        redis_channel=socketio_channel(settings.redis_prefix),
        instance_name=settings.instance_name,
    )
    store = Store(workers=1, batch_max=settings.db_batch_max, synchronous_commit=settings.chat_synchronous_commit)
    replier = Replier(settings, Outbox(sio, metrics), metrics, store)
    replier.gate.keyless = keyless

    probe = HealthProbe.from_settings(settings)

    async def health(request: Request) -> JSONResponse:
        # The checks run on the probe's own thread and connection (isolation/health.py), so a long
        # batch on the store's workers does not delay them; the result is cached briefly.
        report = await probe.check()
        status = 200 if report.ok else 503
        signals = replier.signals
        return JSONResponse(
            {
                "status": report.status,
                "checks": report.checks,
                "database": report.checks.get("database", "error"),
                "connections": len(replier.connections),
                "instance": settings.instance_name or None,
                "unauthenticated": guard.unauthenticated,
                "accepting": replier.accepting,
                "db_batches": store.batches,
                "db_jobs": store.jobs,
                "db_busy_seconds": round(store.busy_seconds, 3),
                "db_cpu_seconds": round(store.cpu_seconds, 3),
                # With REDIS_URL: whether change signals are heard now, and how many were.
                "signals": None
                if signals is None
                else {
                    "subscribed": signals.subscribed.is_set(),
                    "received": signals.received,
                    "dropped": signals.dropped,
                },
            },
            status_code=status,
        )

    async def metrics_route(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @asynccontextmanager
    async def lifespan(app):
        real = isolation_db.configure(settings.database_url)
        version = check_schema(real)
        real.close()
        workers = settings.db_workers or (2 if isolation_db.is_postgres() else 1)
        store.workers = workers
        store.start(asyncio.get_running_loop())
        replier.start()
        log.info(
            "replier %sready on ws://%s:%s/%s (database %s, schema v%d, %d db worker(s), max %d connections)",
            f"{settings.instance_name} " if settings.instance_name else "",
            settings.host,
            settings.port,
            SOCKETIO_PATH,
            describe(settings.database_url),
            version,
            workers,
            settings.max_connections,
        )
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            malformed.flush()
            await replier.drain(settings.grace_seconds)
            await replier.stop()
            await asyncio.to_thread(store.stop)
            await asyncio.to_thread(probe.close)
            isolation_db.close_database()
            log.info("replier stopped")

    web = Starlette(
        routes=[Route("/health", health), Route("/metrics", metrics_route)],
        lifespan=lifespan,
    )
    edge = Edge(
        mount(sio, web, SOCKETIO_PATH),
        path=SOCKETIO_PATH,
        limit=http_buffer_limit(settings),
        body_timeout=settings.http_body_timeout_seconds,
        guard=guard,
        malformed=malformed,
        metrics=metrics,
        media_limit=media_buffer_limit(settings),
        large_per_tenant=settings.max_large_messages_per_tenant,
    )
    return ReplierApp(edge, replier, settings)
