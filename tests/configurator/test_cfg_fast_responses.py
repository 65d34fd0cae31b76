"""The hot read path of `GET /agents`: a body built by the database and sent without pydantic.

It must say exactly what the validated routes say: every item equals `GET /agents/{id}` (serialized
by pydantic from `AgentOut`), and the page validates against the `Page[AgentOut]` it documents.
Also: verified access tokens are remembered only until they expire, the thread pool is sized, and
password checks run beside that pool.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import anyio.to_thread
import pytest
from cfg_helpers import create_agent, make_settings, register
from fastapi.testclient import TestClient

from configurator.core.config import Settings
from configurator.core.security import ACCESS, REFRESH, TokenError, TokenService
from configurator.main import create_app
from configurator.schemas import AgentOut, Page


def test_agent_page_matches_the_validated_single_agent_route(client):
    user = register(client, prefix="fast")
    awkward = ['quote " back\\slash', "<b>html</b>", "'; DROP TABLE agents; --", "emoji 🧪 中文", "tab\tnew\nline"]
    for i, text in enumerate(awkward):
        create_agent(
            client,
            user,
            name=f"{i} {text}",
            description=text,
            template_id="creative_companion" if i % 2 else None,
            persona={"personality": text},
            llm={"provider": "openai", "model": "m", "api_key": "sk-test"} if i % 2 else None,
        )
    response = client.get("/api/v1/agents?limit=3", headers=user.headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    page = response.json()
    Page[AgentOut].model_validate(page)  # the documented shape
    assert page["limit"] == 3 and page["offset"] == 0 and page["next_offset"] == 3
    rest = client.get("/api/v1/agents?limit=3&offset=3", headers=user.headers).json()
    assert rest["next_offset"] is None
    items = page["items"] + rest["items"]
    assert [item["description"] for item in items] == awkward
    for item in items:
        single = client.get(f"/api/v1/agents/{item['id']}", headers=user.headers).json()
        assert AgentOut.model_validate(item) == AgentOut.model_validate(single)
        assert set(item) == set(single)
    assert [item["has_api_key"] for item in items] == [False, True, False, True, False]
    assert "sk-test" not in response.text and "llm_secret" not in response.text
    assert "encrypted_api_key" not in response.text


def test_agent_page_of_an_empty_tenant(client):
    user = register(client, prefix="empty")
    body = client.get("/api/v1/agents", headers=user.headers).json()
    assert body == {"items": [], "limit": 50, "offset": 0, "next_offset": None}


def _tokens(**overrides) -> TokenService:
    return TokenService(Settings(**{"secret_key": "test-secret-key-0123456789abcdef", **overrides}))


def test_verified_access_tokens_are_remembered_until_they_expire():
    tokens = _tokens()
    lifetime = timedelta(minutes=Settings().access_token_minutes)
    # Issued so that it expires about one second from now.
    issued = tokens.issue(ACCESS, "acc_1", "ten_1", now=datetime.now(UTC) - lifetime + timedelta(seconds=1.5))
    first = tokens.decode(issued.token, ACCESS)
    assert tokens._verified[issued.token][0] == first
    assert tokens.decode(issued.token, ACCESS) == first  # served from the cache
    time.sleep(max(0.0, issued.expires_at.replace(tzinfo=UTC).timestamp() - time.time()) + 0.05)
    with pytest.raises(TokenError, match="expired"):  # the cache checks `exp` itself
        tokens.decode(issued.token, ACCESS)
    assert issued.token not in tokens._verified
    with pytest.raises(TokenError, match="expired"):  # and PyJWT agrees: it is not cached again
        tokens.decode(issued.token, ACCESS)
    assert issued.token not in tokens._verified


def test_the_token_cache_never_serves_another_kind_or_key(monkeypatch):
    tokens = _tokens()
    access = tokens.issue(ACCESS, "acc_1", "ten_1").token
    tokens.decode(access, ACCESS)
    with pytest.raises(TokenError):  # cached as an access token, still not a refresh token
        tokens.decode(access, REFRESH)
    other_key = _tokens(secret_key="another-secret-key-0123456789abcdef")
    with pytest.raises(TokenError):
        other_key.decode(access, ACCESS)
    tampered = access[:-2] + ("AA" if not access.endswith("AA") else "BB")
    with pytest.raises(TokenError):
        tokens.decode(tampered, ACCESS)


def test_the_token_cache_is_bounded(monkeypatch):
    tokens = _tokens()
    monkeypatch.setattr(TokenService, "VERIFIED_CACHE_SIZE", 3)
    issued = [tokens.issue(ACCESS, f"acc_{i}", "ten_1").token for i in range(5)]
    for token in issued:
        tokens.decode(token, ACCESS)
    assert list(tokens._verified) == issued[2:]  # the oldest went first
    assert tokens.decode(issued[0], ACCESS).account_id == "acc_0"  # verified again, not lost


def test_threadpool_size_comes_from_the_settings(provisioned):
    seen = []
    app = create_app(make_settings(provisioned, threadpool_size=3))

    @app.get("/_threadpool_probe")
    async def probe() -> dict:
        seen.append(anyio.to_thread.current_default_thread_limiter().total_tokens)
        return {}

    with TestClient(app) as test_client:
        assert test_client.get("/_threadpool_probe").status_code == 200
    assert seen == [3]


def test_password_checks_run_beside_the_route_pool_not_in_it(provisioned):
    """With a route pool of ONE thread, a login stuck in its password check must not block other
    requests, and password checks beyond PASSWORD_HASH_CONCURRENCY wait for each other."""
    app = create_app(make_settings(provisioned, threadpool_size=1, password_hash_concurrency=1))
    entered, release = threading.Event(), threading.Event()
    running, most = [0], [0]
    timed_out: list[str] = []
    lock = threading.Lock()

    with TestClient(app) as test_client:
        user = register(test_client, prefix="pool")
        hasher = app.state.hasher
        real_verify = hasher.verify

        def slow_verify(password, password_hash):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            entered.set()
            if not release.wait(10):  # only if the requests below could not get through meanwhile
                timed_out.append(password)
            with lock:
                running[0] -= 1
            return real_verify(password, password_hash)

        hasher.verify = slow_verify
        results: list[int] = []

        def log_in() -> None:
            body = {"username": user.username, "password": user.password}
            results.append(test_client.post("/api/v1/auth/login", json=body).status_code)

        logins = [threading.Thread(target=log_in) for _ in range(2)]
        for thread in logins:
            thread.start()
        assert entered.wait(10)
        # Both logins are inside (or queued for) the password check; the only route thread is free.
        listed = test_client.get("/api/v1/agents", headers=user.headers)
        assert listed.status_code == 200 and not release.is_set()
        assert test_client.get("/api/v1/auth/me", headers=user.headers).status_code == 200
        release.set()
        for thread in logins:
            thread.join(30)
    assert results == [200, 200] and timed_out == []
    assert most[0] == 1  # PASSWORD_HASH_CONCURRENCY=1: one Argon2 check at a time
