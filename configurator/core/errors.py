"""One error body everywhere: ``{"error": {"code", "message", "details"}}``.

Handlers cover our own `ApiError`, the isolation errors (a foreign id is a `NotFound` like a missing
one), FastAPI's validation errors, Starlette's 404/405, database outages (503 `database_unavailable` or
`storage_full` with `Retry-After`, classified by `isolation.faults`) and anything unexpected (a 500
without internals).

Failures are logged through throttles (`isolation.logthrottle`): one line per kind and interval with
a count, the traceback only on the first line of an episode. Database errors are handled here rather
than by Starlette's last-resort middleware, which would log a second traceback through uvicorn.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from isolation.errors import Conflict, InvalidContextError, InvalidValueError, IsolationViolationError, NotFound
from isolation.faults import database_errors, handle
from isolation.logthrottle import FaultLog, ThrottledLog

log = logging.getLogger("configurator")

FAULT_LOG_SECONDS = 10.0
faults = FaultLog(log, FAULT_LOG_SECONDS)  # database outages: one line per kind per interval
unexpected = ThrottledLog(log, FAULT_LOG_SECONDS, logging.ERROR)  # bugs: one per (type, route) per interval


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


BEARER_CHALLENGE = 'Bearer realm="maitenant"'


def unauthorized(message: str = "authentication required", *, invalid: bool = True) -> ApiError:
    challenge = BEARER_CHALLENGE + (', error="invalid_token"' if invalid else "")
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def error_response(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}
    return JSONResponse(body, status_code=status_code, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "service_unavailable",
}


def _validation_details(exc: RequestValidationError) -> list[dict]:
    details = []
    for err in exc.errors():
        # The offending input is left out: it may be a password or a secret.
        details.append({"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type")})
    return details


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    entity = getattr(exc, "entity", None) or "resource"
    return error_response(404, "not_found", f"{entity} not found")


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return error_response(409, "conflict", str(exc), {"entity": exc.entity})


async def _invalid_value(request: Request, exc: InvalidValueError) -> JSONResponse:
    return error_response(422, "validation_error", str(exc))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "validation_error", "request validation failed", _validation_details(exc))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "error" if exc.status_code >= 500 else "bad_request")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    return error_response(exc.status_code, code, message, None, getattr(exc, "headers", None))


async def _isolation_violation(request: Request, exc: IsolationViolationError) -> JSONResponse:
    # A narrower context was needed than the route built: a bug, never the client's fault, but it
    # must not reveal anything either.
    log.error("isolation violation on %s %s: %s", request.method, request.url.path, exc)
    return error_response(500, "internal_error", "internal server error")


def _route(request: Request) -> str:
    """The route's path template (ids left out), so one failing route is one log key."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', None) or request.url.path}"


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 with `Retry-After` for an outage (the client should retry), else the 500 of a bug."""
    fault = handle(exc)
    if fault is None:
        return await _unexpected(request, exc)
    faults.report(fault, _route(request), exc)
    headers = {"Retry-After": str(fault.retry_after)}
    return error_response(503, fault.code, fault.message, {"retryable": True}, headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    what = _route(request)
    unexpected.log(type(exc).__name__, what, "unhandled error on %s: %s", what, type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(InvalidContextError, _not_found)
    app.add_exception_handler(InvalidValueError, _invalid_value)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(IsolationViolationError, _isolation_violation)
    for error_type in database_errors():
        app.add_exception_handler(error_type, _database_error)
    app.add_exception_handler(Exception, _unexpected)


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or expired access token"},
    403: {"model": ErrorResponse, "description": "The caller's role may not do this"},
    404: {"model": ErrorResponse, "description": "Not found (also for ids of other tenants)"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI response entries for the given error status codes (all share `ErrorResponse`).

    400 (malformed JSON or Content-Length), 413 (body too large) and 422 (validation) can happen on
    every operation, so they are always documented.
    """
    out: dict[int | str, dict[str, Any]] = {}
    descriptions = {
        400: "Malformed request (e.g. unparseable JSON)",
        409: "Conflict with existing data",
        429: "Too many attempts",
        503: "Database unavailable or storage full: retry after `Retry-After` seconds",
    }
    for code in sorted({*codes, 400, 413, 422, 503}):
        out[code] = COMMON_RESPONSES.get(code) or {"model": ErrorResponse, "description": descriptions[code]}
    return out
