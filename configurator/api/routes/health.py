"""`GET /health`: the database answers, takes a write and has disk left (`isolation.health`).

The checks run on the probe's own thread (not the route thread pool, which may be full under load)
and are cached for `HEALTH_CACHE_SECONDS`; the schema version was checked at start. A failed check
answers 503 with the usual error body plus the same per-check report.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from configurator.core.errors import ErrorResponse, responses
from configurator.schemas import HealthOut
from isolation.migrate import LATEST_VERSION

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={**responses(), 503: {"model": ErrorResponse, "description": "A check failed (see `checks`)"}},
)
async def health(request: Request):
    report = await request.app.state.health.check()
    body = {"database": request.app.state.database_kind, "schema_version": LATEST_VERSION, **report.body()}
    if report.ok:
        return body
    failed = {name: value for name, value in report.checks.items() if value.startswith("error")}
    body["error"] = {"code": "unavailable", "message": "health check failed", "details": {"checks": failed}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
