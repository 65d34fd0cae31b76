"""With REDIS_URL the login/register limits are counted in Redis: two configurator apps (two workers
or hosts) of one deployment enforce one limit. Without Redis each counted alone (twice the guesses).
When Redis fails, each worker falls back to counting alone, with one warning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from cfg_helpers import PASSWORD, make_settings, register, unique
from fastapi.testclient import TestClient

from configurator.core.redis_limits import RedisSlidingWindowLimiter, redis_client
from configurator.main import create_app
from testsupport.redis_server import PrivateRedis, require_redis, unique_prefix


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_redis()


@contextmanager
def workers(provisioned, redis_url: str, count: int = 2, **limits) -> Iterator[list[TestClient]]:
    """`count` apps sharing one Redis prefix, as `uvicorn --workers` would run them."""
    prefix = unique_prefix()
    settings = make_settings(provisioned, redis_url=redis_url, redis_prefix=prefix, **limits)
    with ExitStack() as stack:
        clients = [
            stack.enter_context(TestClient(create_app(settings), client=("198.51.100.1", 40000))) for _ in range(count)
        ]
        yield clients


def _login(client, username: str, password: str) -> httpx.Response:
    return client.post("/api/v1/auth/login", json={"username": username, "password": password})


def test_failed_logins_on_two_workers_count_toward_one_account_limit(provisioned, redis_url):
    with workers(provisioned, redis_url, login_rate_limit=4) as (first, second):
        user = register(first)
        for client in (first, second, first, second):
            assert _login(client, user.username, "wrong-password-1").status_code == 401
        for client in (first, second):
            response = _login(client, user.username, PASSWORD)
            assert response.status_code == 429, response.text
            assert 1 <= int(response.headers["retry-after"]) <= 60


def test_a_success_on_one_worker_resets_the_bucket_on_all(provisioned, redis_url):
    with workers(provisioned, redis_url, login_rate_limit=3) as (first, second):
        user = register(first)
        for _ in range(2):
            assert _login(second, user.username, "wrong-password-1").status_code == 401
        assert _login(first, user.username, PASSWORD).status_code == 200
        for _ in range(2):
            assert _login(second, user.username, "wrong-password-1").status_code == 401
        assert _login(second, user.username, PASSWORD).status_code == 200


def test_address_and_registration_limits_are_shared(provisioned, redis_url):
    limits = {"login_address_rate_limit": 2, "register_rate_limit": 2}
    with workers(provisioned, redis_url, **limits) as (first, second):
        register(first)
        register(second)
        name = unique("reg")
        body = {"username": name, "email": f"{name}@example.com", "password": PASSWORD}
        response = first.post("/api/v1/auth/register", json=body)
        assert response.status_code == 429 and 3500 <= int(response.headers["retry-after"]) <= 3600
        assert _login(first, unique("spray"), "Password123!").status_code == 401
        assert _login(second, unique("spray"), "Password123!").status_code == 401
        assert _login(first, unique("spray"), "Password123!").status_code == 429


def test_parallel_guesses_on_two_workers_get_one_limit(provisioned, redis_url):
    """12 guesses at once, half on each worker: exactly 3 password checks (the script is atomic)."""
    prefix = unique_prefix()
    settings = make_settings(
        provisioned, redis_url=redis_url, redis_prefix=prefix, login_rate_limit=3, password_hash_time_cost=2
    )
    apps = [create_app(settings), create_app(settings)]

    async def burst(username: str) -> list[int]:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("198.51.100.9", 1)), base_url="http://t")
            for app in apps
        ]
        requests = [
            clients[i % 2].post("/api/v1/auth/login", json={"username": username, "password": f"guess-{i}-abcdef"})
            for i in range(12)
        ]
        statuses = [r.status_code for r in await asyncio.gather(*requests)]
        for client in clients:
            await client.aclose()
        return statuses

    with TestClient(apps[0]) as client, TestClient(apps[1]):
        user = register(client)
        statuses = asyncio.run(burst(user.username))
    assert sorted(statuses) == [401] * 3 + [429] * 9


def test_redis_down_falls_back_to_counting_in_the_process(provisioned, caplog):
    """Not fail-open (every guess allowed) and not fail-closed (nobody can sign in)."""
    dead = PrivateRedis()  # its port has nothing listening
    RedisSlidingWindowLimiter._warned_at = float("-inf")  # another test's outage may have warned already
    settings = make_settings(provisioned, redis_url=f"redis://:pw-in-url@127.0.0.1:{dead.port}/0", login_rate_limit=2)
    with TestClient(create_app(settings)) as client, caplog.at_level("WARNING", logger="configurator"):
        user = register(client)
        for _ in range(2):
            assert _login(client, user.username, "wrong-password-1").status_code == 401
        assert _login(client, user.username, PASSWORD).status_code == 429
    warnings = [r.getMessage() for r in caplog.records if "rate limits: Redis failed" in r.getMessage()]
    assert len(warnings) == 1  # once per interval, not per call
    assert "pw-in-url" not in caplog.text


def test_the_limiter_reconnects_when_redis_comes_back(redis_url):
    private = PrivateRedis().start()
    limiter = RedisSlidingWindowLimiter(redis_client(private.url), unique_prefix(), "unit", 2, 30)
    try:
        assert limiter.acquire(("account", "a1")) is None
        limiter.hit(("account", "a1"))
        assert limiter.retry_after(("account", "a1")) in range(1, 31)
        assert limiter.acquire(("account", "a1")) in range(1, 31)
        private.stop()
        limiter.reset(("account", "a1"))  # Redis down: the in-process fallback is reset, nothing raised
        assert limiter.acquire(("account", "a1")) is None  # counted in the fallback
        private.start()
        # Redis answers again (a restarted in-memory server: empty): counted there once more.
        assert limiter.acquire(("account", "a1")) is None
        assert limiter.acquire(("account", "a1")) is None
        assert limiter.acquire(("account", "a1")) in range(1, 31)
    finally:
        private.stop()


def test_a_tenant_request_limit_is_one_limit_for_every_worker(provisioned, redis_url):
    """requests_per_minute counted in Redis: 4 requests in total pass, on whichever worker."""
    with workers(provisioned, redis_url, tenant_requests_per_minute=4, limit_window_seconds=3600.0) as pair:
        user = register(pair[0])
        left = 3600 - time.time() % 3600
        if left < 10:  # the requests must fall in one window (aligned to the epoch)
            time.sleep(left + 0.05)
        statuses = [pair[i % 2].get("/api/v1/agents", headers=user.headers).status_code for i in range(7)]
        assert statuses == [200] * 4 + [429] * 3
        refused = pair[1].get("/api/v1/agents", headers=user.headers)
        assert refused.json()["error"]["details"]["limit"] == "requests_per_minute"
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
