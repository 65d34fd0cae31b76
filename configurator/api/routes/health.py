"""`GET /health`: the process is up and the database answers (the schema version was checked at start)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from configurator.core.db import ping
from configurator.core.errors import ErrorResponse, error_response, responses
from configurator.schemas import HealthOut
from isolation.migrate import LATEST_VERSION

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthOut,
    responses={**responses(), 503: {"model": ErrorResponse, "description": "Database unavailable"}},
)
def health(request: Request):
    try:
        ping()
    except Exception as exc:
        return error_response(503, "unavailable", "database not reachable", {"reason": type(exc).__name__})
    return HealthOut(status="ok", database=request.app.state.database_kind, schema_version=LATEST_VERSION)
