"""Security headers on every response (a pure ASGI middleware: no per-request objects).

Every response says: do not sniff the content type, never frame me, send no referrer, and (API
responses) load nothing — the API serves JSON, not pages, so the strictest Content-Security-Policy
costs nothing. The interactive docs pages (`/docs`, `/redoc`, when enabled) get a policy that allows
the Swagger UI / ReDoc assets FastAPI loads from their CDN. Responses under `/api/v1` are never
stored by a browser or proxy (`Cache-Control: no-store`): they carry tokens and tenant data. Over
HTTPS (directly, or a trusted proxy's `X-Forwarded-Proto`), HSTS keeps the browser on HTTPS.

`create_app` wraps the whole Starlette stack with this, so even a 500 from the outermost error
handler carries the headers.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# What FastAPI's Swagger UI and ReDoc pages need: their scripts and styles from jsDelivr (and an
# inline bootstrap script), the FastAPI favicon, ReDoc's Google font and web worker, and fetching
# /openapi.json from this origin.
DOCS_CSP = (
    "default-src 'none'; "
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HSTS = b"max-age=31536000"

_COMMON = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, api_prefix: str, docs_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.api_prefix = api_prefix
        self.docs_paths = frozenset(docs_paths)
        self._api = [*_COMMON, (b"content-security-policy", API_CSP.encode())]
        self._docs = [*_COMMON, (b"content-security-policy", DOCS_CSP.encode())]

    def _extra(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        path: str = scope.get("path", "")
        extra = list(self._docs if path in self.docs_paths else self._api)
        if path.startswith(self.api_prefix):
            extra.append((b"cache-control", b"no-store"))
        if scope.get("scheme") == "https":
            extra.append((b"strict-transport-security", HSTS))
        return extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self._extra(scope)
        names = {name for name, _ in extra}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in names]
                message["headers"] = headers + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)
