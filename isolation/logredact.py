"""Secrets out of log lines: a logging filter both backends install on every handler at start-up.

uvicorn logs a websocket's path with its query string at INFO (maim_message's external-client guide puts
the API key there: `?apikey=mtk_...`), the configurator's access log does the same for every request, and
at DEBUG python-socketio, python-engineio and uvicorn's protocol code may print headers (`x-apikey`,
`authorization`, `cookie`). Rather than chase each call site, `RedactingFilter` rewrites each emitted
record's final message: values of sensitive query parameters and headers, `mtk_` API keys, JWTs and
`Bearer` tokens become `[redacted]`. A filter on a handler runs only for records that handler emits, so
a suppressed DEBUG call costs nothing.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
SENSITIVE_PARAMS = ("api_key", "apikey", "key", "token", "access_token", "refresh_token", "password", "secret")
SENSITIVE_HEADERS = ("x-apikey", "authorization", "cookie", "set-cookie")
# Loggers that have (or may get) handlers of their own; the root logger's handlers are covered too.
LOGGERS = (
    "",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "engineio",
    "engineio.server",
    "socketio",
    "socketio.server",
)

_PARAMS = "|".join(re.escape(name) for name in SENSITIVE_PARAMS)
# x-apikey, X_APIKEY, HTTP_X_APIKEY (a WSGI-style environ) alike
_HEADERS = "|".join(re.escape(name).replace("\\-", "[-_]") for name in SENSITIVE_HEADERS)
# an unquoted header value: one token (after an optional scheme such as Bearer), `; `-joined for cookies
_VALUE = r"[^\s,;)\]}'\"]+"
_PATTERNS = (
    # ?apikey=... / &token=... (a query string, a form body, a URL anywhere in the line)
    (re.compile(rf"(?i)([?&;](?:{_PARAMS})=)[^&;#\s\"']*"), rf"\g<1>{REDACTED}"),
    # "x-apikey": "..." / b'authorization', b'...' / Cookie: ... (dicts, ASGI header tuples, raw headers)
    (
        re.compile(
            rf"(?i)(b?['\"]?(?:{_HEADERS})(?:['\"]\s*[:,=]|\s*[:=])\s*)"
            rf"(?:b?'[^']*'|b?\"[^\"]*\"|(?:[A-Za-z]+\s+)?{_VALUE}(?:;\s*{_VALUE})*)"
        ),
        rf"\g<1>{REDACTED}",
    ),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # a key (`mtk_` + 43 characters); "mtk_" plus a few characters, the prefix logs may name, is kept
    (re.compile(r"\bmtk_[A-Za-z0-9_-]{9,}"), "mtk_" + REDACTED),
)


def redact(text: str) -> str:
    """`text` with every secret shape this module knows replaced by `[redacted]`."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Replaces a record's message (format arguments applied) by its redacted form; never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            _rewrite(record, clean)
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _rewrite(record: logging.LogRecord, clean: str) -> None:
    """Redact the record's string arguments where that suffices, else replace its message.

    uvicorn's access formatter reads the request line from `record.args`, so arguments are kept when
    redacting them one by one removes every secret; otherwise the message is replaced by `clean`.
    """
    args = record.args
    if isinstance(args, tuple) and isinstance(record.msg, str):
        record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in args)
        if record.getMessage() == clean:
            return
    record.msg, record.args = clean, None


def install(loggers: tuple[str, ...] = LOGGERS) -> RedactingFilter:
    """Attach one `RedactingFilter` to every handler of `loggers` (call after logging is configured).

    uvicorn configures its loggers when the server starts; `uvicorn_log_config` puts the filter in that
    configuration so its handlers have it from their creation.
    """
    flt = RedactingFilter()
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(flt)
    return flt


def uvicorn_log_config() -> dict:
    """uvicorn's default logging configuration with the redacting filter on its handlers."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactingFilter}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return config
