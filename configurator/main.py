"""The configurator application factory: `create_app()`.

At start-up (the lifespan) the thread pool of the sync routes is sized (`THREADPOOL_SIZE`), the
isolation database is configured from the settings and the schema version is checked: an old or
unknown schema stops the start with the command to run.

Every response gets security headers (configurator/core/headers.py, wrapped around the whole stack).
`/docs`, `/redoc` and `/openapi.json` are served in development and, in production, only with
`DOCS_ENABLED=true`: the schema is a map of every route for whoever asks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp

from configurator.api.main import api_router
from configurator.api.routes import health
from configurator.core.body_limit import BodySizeLimitMiddleware
from configurator.core.config import API_PREFIX, Settings, get_settings
from configurator.core.db import close_database, init_database
from configurator.core.errors import install_error_handlers
from configurator.core.headers import SecurityHeadersMiddleware
from configurator.core.passwords import common_passwords
from configurator.core.redis_limits import limiter, redis_client
from configurator.core.security import PasswordHasher, TokenService
from configurator.core.tenant_limits import RestLimits
from isolation.db import parse_database_url
from isolation.health import HealthProbe
from isolation.redis_counter import RedisWindowCounter
from isolation.signals import publisher

log = logging.getLogger("configurator")

DESCRIPTION = """\
Self-service API of MaiTenant: accounts, tenants, agents, agent templates, API keys, chat history,
memories and stats. Authenticate with `POST /api/v1/auth/login` (or `/register`) and send the access
token as `Authorization: Bearer <token>`. Every error has the body
`{"error": {"code", "message", "details"}}`.
"""


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")


class ConfiguratorApp(FastAPI):
    """FastAPI with the security headers outside Starlette's own error middleware, so that every
    response, a 500 included, carries them."""

    def build_middleware_stack(self) -> ASGIApp:
        docs = DOCS_PATHS if self.docs_url else ()
        return SecurityHeadersMiddleware(super().build_middleware_stack(), api_prefix=API_PREFIX, docs_paths=docs)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    common_passwords()  # read the bundled list now, not during the first registration
    docs = settings.docs_served

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = settings.threadpool_size
        version = await run_in_threadpool(init_database, settings)
        log.info("configurator ready: %s database, schema version %s", app.state.database_kind, version)
        try:
            yield
        finally:
            app.state.health.close()
            await run_in_threadpool(close_database)

    app = ConfiguratorApp(
        title="MaiTenant configurator",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.settings = settings
    app.state.tokens = TokenService(settings)
    app.state.hasher = PasswordHasher(settings)
    window = settings.login_rate_window_seconds
    # Counted in Redis with REDIS_URL (one limit for every worker and host), else in this process.
    shared = redis_client(settings.redis_url)
    prefix = settings.redis_prefix
    app.state.limits_redis = shared
    app.state.login_limiter = limiter(shared, prefix, "login", settings.login_rate_limit, window)  # per account
    app.state.login_address_limiter = limiter(
        shared, prefix, "login-address", settings.login_address_rate_limit, window
    )
    app.state.register_limiter = limiter(
        shared, prefix, "register", settings.register_rate_limit, settings.register_rate_window_seconds
    )
    # Per-tenant requests and suspension; with REDIS_URL one count per tenant for every worker.
    app.state.rest_limits = RestLimits(settings, RedisWindowCounter(shared, prefix) if shared is not None else None)
    app.state.database_kind = parse_database_url(settings.database_url).dialect
    app.state.health = HealthProbe.from_settings(settings)
    app.state.signals = publisher(settings.redis_url, settings.redis_prefix)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(api_router, prefix=API_PREFIX)
    return app
