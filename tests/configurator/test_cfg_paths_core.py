"""Core pieces of the configurator on their less travelled paths: body limit, tokens, error handlers,
settings, storability checks and the database wiring."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cfg_helpers import create_agent, seed_history, unique
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from configurator.core import db as core_db
from configurator.core.body_limit import BodySizeLimitMiddleware, BodyTooLarge
from configurator.core.config import get_settings
from configurator.core.errors import install_error_handlers
from configurator.core.security import ACCESS, ALGORITHM, REFRESH, PasswordHasher, TokenError, TokenService
from configurator.schemas import check_storable
from isolation import IsolationViolationError, Scoped
from isolation import db as isolation_db


# -- body size limit (the middleware on its own, around a bare ASGI app) --------------------------
def _run(middleware, scope: dict, messages: list[dict]) -> list[dict]:
    """Drive `middleware` with the given request messages; returns what it sent."""
    incoming = list(messages)
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


def _http_scope(headers=()):
    return {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}


def _reading_app(seen: list):
    """Reads the whole body, then answers 200 with the byte count."""

    async def app(scope, receive, send):
        total = 0
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(total).encode()})

    return app


def _chunks(sizes: list[int]) -> list[dict]:
    return [
        {"type": "http.request", "body": b"x" * size, "more_body": i < len(sizes) - 1} for i, size in enumerate(sizes)
    ]


def test_unparseable_content_length_is_400():
    seen: list = []
    sent = _run(BodySizeLimitMiddleware(_reading_app(seen), 100), _http_scope([(b"content-length", b"ten")]), [])
    assert sent[0]["status"] == 400
    assert b"invalid Content-Length" in sent[1]["body"]
    assert seen == []  # the application never ran


def test_chunked_body_over_the_limit_is_413_before_the_app_answers():
    seen: list = []
    sent = _run(BodySizeLimitMiddleware(_reading_app(seen), 100), _http_scope(), _chunks([60, 60, 60]))
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]
    assert b'"payload_too_large"' in sent[-1]["body"]
    assert seen == ["http.request"]  # the second chunk crossed the limit and was never handed over


def test_chunked_body_within_the_limit_and_disconnects_pass_through():
    seen: list = []
    sent = _run(BodySizeLimitMiddleware(_reading_app(seen), 100), _http_scope(), _chunks([50, 50]))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"100"
    seen.clear()
    disconnect = _run(BodySizeLimitMiddleware(_reading_app(seen), 100), _http_scope(), [{"type": "http.disconnect"}])
    assert seen == ["http.disconnect"] and disconnect[0]["status"] == 200 and disconnect[1]["body"] == b"0"


def test_a_body_over_the_limit_after_the_response_started_is_raised_not_answered_twice():
    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    sent: list[dict] = []
    incoming = _chunks([80, 80])

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    with pytest.raises(BodyTooLarge):
        asyncio.run(BodySizeLimitMiddleware(streaming_app, 100)(_http_scope(), receive, send))
    assert [m["status"] for m in sent] == [200]


# -- passwords and tokens ------------------------------------------------------------------------
def test_an_unreadable_stored_hash_never_authenticates(settings):
    hasher = PasswordHasher(settings)
    assert hasher.verify("anything", "not-an-argon2-hash") == (False, None)
    assert hasher.verify("anything", "") == (False, None)
    good = hasher.hash("right")
    assert hasher.verify("right", good)[0] is True


def _signed(settings, **overrides) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": "acc_x",
        "tid": "ten_x",
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": "jti_x",
        "sid": "sid_x",
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "typ": ACCESS,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, settings.secret_key, algorithm=ALGORITHM)


def test_empty_oversized_and_incomplete_tokens_are_refused(settings):
    tokens = TokenService(settings)
    for malformed in ("", "x" * 4097):
        with pytest.raises(TokenError, match="malformed"):
            tokens.decode(malformed, ACCESS)
    claims = tokens.decode(_signed(settings), ACCESS)
    assert (claims.tenant_id, claims.session_id) == ("ten_x", "sid_x")
    for bad in ({"tid": ""}, {"tid": 42}, {"sub": ""}, {"sid": ""}, {"sid": 7}, {"sid": None}):
        with pytest.raises(TokenError, match="invalid token"):
            tokens.decode(_signed(settings, **bad), ACCESS)


def test_a_signed_token_naming_impossible_ids_is_401_not_a_database_error(client, settings, owner):
    tokens = TokenService(settings)
    forged_tenant = tokens.issue(ACCESS, owner.account_id, "ten with spaces!").token
    forged_account = tokens.issue(ACCESS, "acc'; DROP TABLE agents;--", owner.tenant_id).token
    for token in (forged_tenant, forged_account):
        response = client.get("/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    refresh = tokens.issue(REFRESH, owner.account_id, "ten with spaces!").token
    response = client.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
    assert response.status_code == 401 and response.json()["error"]["message"] == "refresh token no longer valid"
    # The real owner is unaffected.
    assert client.get("/api/v1/agents", headers=owner.headers).status_code == 200


def test_logout_with_an_impossible_tenant_or_an_unknown_refresh_token_is_401(client, settings, owner):
    tokens = TokenService(settings)
    impossible = tokens.issue(REFRESH, owner.account_id, "ten with spaces!").token
    response = client.post("/api/v1/auth/logout", json={"refresh_token": impossible})
    assert response.status_code == 401 and response.json()["error"]["message"] == "invalid token"
    never_stored = tokens.issue(REFRESH, owner.account_id, owner.tenant_id).token
    response = client.post("/api/v1/auth/logout", json={"refresh_token": never_stored})
    assert response.status_code == 401 and response.json()["error"]["message"] == "refresh token unknown"
    # The owner's real refresh token still works afterwards.
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": owner.refresh_token}).status_code == 200


# -- error handlers ------------------------------------------------------------------------------
def test_isolation_violations_and_unexpected_errors_are_opaque_500s(caplog):
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/violation")
    def violation():
        raise IsolationViolationError("chat history needs T+A+C+P, got T (tenant ten_secret)")

    @app.get("/crash")
    def crash():
        raise RuntimeError("password=hunter2")

    with caplog.at_level(logging.ERROR, logger="configurator"), TestClient(app, raise_server_exceptions=False) as tc:
        violation_response = tc.get("/violation")
        crash_response = tc.get("/crash")
    for response, leaked in ((violation_response, "ten_secret"), (crash_response, "hunter2")):
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal_error", "message": "internal server error", "details": None}
        }
        assert leaked not in response.text
    logged = caplog.text
    assert "isolation violation on GET /violation" in logged and "ten_secret" in logged
    assert "unhandled error on GET /crash" in logged


# -- settings ------------------------------------------------------------------------------------
def test_get_settings_reads_the_environment_once(monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "from-the-environment-0123456789")
    monkeypatch.setenv("ENVIRONMENT", "development")
    get_settings.cache_clear()
    try:
        first = get_settings()
        assert first.secret_key == "from-the-environment-0123456789"
        monkeypatch.setenv("SECRET_KEY", "changed-later-0123456789abcdef")
        assert get_settings() is first
    finally:
        get_settings.cache_clear()


# -- storability ---------------------------------------------------------------------------------
class _Inner(BaseModel):
    text: str


def test_check_storable_rejects_lone_surrogates_and_looks_inside_models():
    with pytest.raises(ValueError, match="valid unicode"):
        check_storable({"persona": ["fine", "lone \ud800"]})
    with pytest.raises(ValueError, match="NUL"):
        check_storable({"nested": [_Inner(text="a\x00b")]})
    with pytest.raises(ValueError, match="finite"):
        check_storable((1.0, float("nan")))
    check_storable({"ok": [_Inner(text="文字 🙂"), 1.5, None, True]})


# -- routes: values stored before validation tightened, platform mismatch -------------------------
def test_updating_an_agent_whose_stored_persona_no_longer_validates_is_422(client, owner):
    legacy = Scoped(owner.ctx).agents.create(
        name=unique("legacy-"), persona={"personality": "p", "retired_field": 1}, config={}, llm={}
    )
    response = client.patch(
        f"/api/v1/agents/{legacy['id']}", json={"persona": {"personality": "new"}}, headers=owner.headers
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["message"]) == ("validation_error", "invalid persona")
    assert ["persona", "retired_field"] in [d["loc"] for d in error["details"]]
    assert Scoped(owner.ctx).agents.get(legacy["id"])["persona"]["personality"] == "p"


def test_a_memory_for_a_chat_stream_must_name_the_streams_platform(client, owner):
    agent = create_agent(client, owner)
    stream = seed_history(owner, agent["id"], platform="qq")["stream"]
    base = f"/api/v1/agents/{agent['id']}/memories"
    body = {"content": "mismatch", "chat_stream_id": stream["id"], "platform": "wechat"}
    response = client.post(base, json=body, headers=owner.headers)
    assert response.status_code == 422
    assert "platform does not match" in response.json()["error"]["message"]
    matching = client.post(base, json={**body, "platform": "qq"}, headers=owner.headers)
    assert matching.status_code == 201 and matching.json()["level"] == "chat"


# -- database wiring -----------------------------------------------------------------------------
@pytest.fixture
def unconfigured(client):
    saved = isolation_db.database.obj
    isolation_db.database.initialize(None)
    try:
        yield
    finally:
        isolation_db.database.initialize(saved)


def test_without_a_configured_database_connections_fail_clearly_and_closing_is_a_no_op(unconfigured):
    with pytest.raises(RuntimeError, match="not configured"), core_db.connection():
        pytest.fail("unreachable")
    with pytest.raises(RuntimeError, match="not configured"):
        core_db.ping()
    assert core_db.close_database() is None
    assert isolation_db.database.obj is None
