"""The configurator application factory: `create_app()`.

At start-up (the lifespan) the thread pool of the sync routes is sized (`THREADPOOL_SIZE`), the
isolation database is configured from the settings and the schema version is checked: an old or
unknown schema stops the start with the command to run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from configurator.api.main import api_router
from configurator.api.routes import health
from configurator.core.body_limit import BodySizeLimitMiddleware
from configurator.core.config import API_PREFIX, Settings, get_settings
from configurator.core.db import close_database, init_database
from configurator.core.errors import install_error_handlers
from configurator.core.ratelimit import SlidingWindowLimiter
from configurator.core.security import PasswordHasher, TokenService
from isolation.db import parse_database_url

log = logging.getLogger("configurator")

DESCRIPTION = """\
Self-service API of MaiTenant: accounts, tenants, agents, agent templates, API keys, chat history,
memories and stats. Authenticate with `POST /api/v1/auth/login` (or `/register`) and send the access
token as `Authorization: Bearer <token>`. Every error has the body
`{"error": {"code", "message", "details"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = settings.threadpool_size
        version = await run_in_threadpool(init_database, settings)
        log.info("configurator ready: %s database, schema version %s", app.state.database_kind, version)
        try:
            yield
        finally:
            await run_in_threadpool(close_database)

    app = FastAPI(
        title="MaiTenant configurator",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
    )
    app.state.settings = settings
    app.state.tokens = TokenService(settings)
    app.state.hasher = PasswordHasher(settings)
    app.state.login_limiter = SlidingWindowLimiter(settings.login_rate_limit, settings.login_rate_window_seconds)
    app.state.database_kind = parse_database_url(settings.resolved_database_url).dialect
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(api_router, prefix=API_PREFIX)
    return app
