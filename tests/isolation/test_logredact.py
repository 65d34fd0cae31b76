"""The redacting log filter (isolation/logredact.py): each secret shape goes, ordinary text stays.

Both backends install it on every handler at start-up; these tests pin what it recognises, that it
works on the final message (format arguments included) and that uvicorn's access records, whose
formatter reads `record.args`, still format after redaction.
"""

from __future__ import annotations

import io
import logging
import sys
import uuid

import pytest
from uvicorn.logging import AccessFormatter

from isolation.logredact import REDACTED, RedactingFilter, install, redact, uvicorn_log_config

KEY = "mtk_" + "A1b2C3d4" * 5 + "xyz"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0In0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f'127.0.0.1:5 - "WebSocket /ws/?EIO=4&transport=websocket&apikey={KEY}" [accepted]', KEY),
        ('"GET /ws/?api_key=plain-secret-1&EIO=4 HTTP/1.1" 200', "plain-secret-1"),
        ("GET /x?token=t0ken-value HTTP/1.1", "t0ken-value"),
        ("GET /x?a=1&access_token=at-value#frag", "at-value"),
        ("POST /x?password=hunter2&key=k-value", "hunter2"),
        ("POST /x?password=hunter2&key=k-value", "k-value"),
        ("GET /x?SECRET=s-value", "s-value"),
        (f"presented {KEY} at connect", KEY),
        (f"tokens {JWT} issued", JWT),
        ("Authorization: Bearer opaque-token.value", "opaque-token.value"),
        ("sent bearer abc123def", "abc123def"),
        ("headers [(b'x-apikey', b'raw-key-1'), (b'host', b'localhost')]", "raw-key-1"),
        ("{'HTTP_X_APIKEY': 'raw-key-2', 'HTTP_HOST': 'x'}", "raw-key-2"),
        ('{"authorization": "Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz"),
        ("cookie: session=abc123; theme=dark", "abc123"),
        ("Set-Cookie: sid=s3cr3t; HttpOnly", "s3cr3t"),
    ],
)
def test_each_secret_shape_is_redacted(text: str, secret: str) -> None:
    clean = redact(text)
    assert secret not in clean
    assert REDACTED in clean


@pytest.mark.parametrize(
    "text",
    [
        "GET /api/v1/agents?limit=5&offset=10 HTTP/1.1 200",
        "GET /x?monkey=1&keys=2&tokens=3",  # names that merely contain a sensitive one
        "refused connection from 127.0.0.1: invalid_key (platform qq, key mtk_AbCd)",  # a key prefix is kept
        "connection conn_x accepted (api, key key_123)",
        "the password field is required",
        "eyJ alone is not a token",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def _record(msg: str, *args: object, name: str = "t") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


def test_the_filter_redacts_format_arguments_and_keeps_the_record() -> None:
    record = _record("connect from %s with %s (%d)", "127.0.0.1", f"x-apikey: {KEY}", 3)
    assert RedactingFilter().filter(record) is True
    message = record.getMessage()
    assert KEY not in message and message.startswith("connect from 127.0.0.1 with x-apikey: [redacted]")
    assert message.endswith("(3)")


def test_a_secret_split_across_arguments_is_still_redacted() -> None:
    record = _record("%s%s", "/ws/?apikey=", "plain-value")
    RedactingFilter().filter(record)
    assert "plain-value" not in record.getMessage()


def test_uvicorn_access_records_still_format() -> None:
    """uvicorn's access formatter unpacks `record.args`: they are redacted in place, not dropped."""
    record = _record(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:9",
        "GET",
        f"/health?apikey={KEY}",
        "1.1",
        200,
        name="uvicorn.access",
    )
    RedactingFilter().filter(record)
    line = AccessFormatter(fmt="%(client_addr)s %(request_line)s %(status_code)s", use_colors=False).format(record)
    assert KEY not in line and "/health?apikey=[redacted]" in line and "200" in line


def test_tracebacks_are_redacted() -> None:
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    RedactingFilter().filter(record)
    assert KEY not in logging.Formatter().format(record)


def test_install_covers_every_handler_of_the_named_loggers_once() -> None:
    logger = logging.getLogger(f"logredact-test-{uuid.uuid4().hex[:6]}")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install((logger.name,))
        install((logger.name,))
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.warning("GET /?token=%s", "value-123")
        assert "value-123" not in stream.getvalue() and "token=[redacted]" in stream.getvalue()
    finally:
        logger.removeHandler(handler)


def test_uvicorn_log_config_filters_its_handlers() -> None:
    config = uvicorn_log_config()
    assert all("redact" in handler["filters"] for handler in config["handlers"].values())
    assert config["filters"]["redact"]["()"] is RedactingFilter
