"""Login and registration limits: per account (username and email one bucket) and per client address.

Each test runs its own app with small limits (the suite's app has the per-address limits lifted);
`TestClient(client=...)` sets the TCP peer address the limits count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from cfg_helpers import PASSWORD, make_settings, register, unique
from fastapi.testclient import TestClient

from configurator.core.ratelimit import SlidingWindowLimiter
from configurator.main import create_app


@contextmanager
def limited_app(provisioned, **limits) -> Iterator:
    app = create_app(make_settings(provisioned, **limits))
    with (
        TestClient(app, client=("198.51.100.1", 40000)) as first,
        TestClient(app, client=("198.51.100.2", 40000)) as second,
    ):
        yield first, second


def _login(client, username: str, password: str) -> httpx.Response:
    return client.post("/api/v1/auth/login", json={"username": username, "password": password})


def _assert_429(response) -> int:
    assert response.status_code == 429, response.text
    wait = int(response.headers["retry-after"])
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.json()["error"]["details"]["retry_after"] == wait
    return wait


def test_username_and_email_of_one_account_are_one_bucket(provisioned):
    """Before: (username, address) and (email, address) were two buckets, twice the guesses."""
    with limited_app(provisioned, login_rate_limit=4) as (client, _):
        user = register(client)
        for name in (user.username, user.email, user.email.upper(), user.username):
            assert _login(client, name, "wrong-password-1").status_code == 401
        _assert_429(_login(client, user.email, "wrong-password-2"))
        _assert_429(_login(client, user.username, "wrong-password-3"))


def test_the_right_password_is_refused_during_the_lockout_from_any_address(provisioned):
    with limited_app(provisioned, login_rate_limit=3) as (client, elsewhere):
        user = register(client)
        for _ in range(3):
            assert _login(client, user.username, "wrong-password-1").status_code == 401
        assert 1 <= _assert_429(_login(client, user.username, PASSWORD)) <= 60
        _assert_429(_login(elsewhere, user.email, PASSWORD))  # another address: same account, same bucket
        # Other accounts are not affected.
        other = register(client)
        assert _login(client, other.username, PASSWORD).status_code == 200


def test_an_unknown_name_is_a_bucket_of_its_own_case_insensitively(provisioned):
    with limited_app(provisioned, login_rate_limit=2) as (client, _):
        ghost = unique("ghost")
        for name in (ghost, ghost.upper()):
            assert _login(client, name, "wrong-password-1").status_code == 401
        _assert_429(_login(client, f" {ghost} ", "wrong-password-1"))


def test_a_successful_login_resets_the_account_bucket(provisioned):
    with limited_app(provisioned, login_rate_limit=3) as (client, _):
        user = register(client)
        for _ in range(2):
            assert _login(client, user.username, "wrong-password-1").status_code == 401
        assert _login(client, user.username, PASSWORD).status_code == 200
        for _ in range(2):
            assert _login(client, user.username, "wrong-password-1").status_code == 401
        assert _login(client, user.username, PASSWORD).status_code == 200


def test_failed_logins_per_address_are_limited_across_usernames(provisioned):
    """Spraying one password over many accounts from one address hits the address limit."""
    with limited_app(provisioned, login_rate_limit=5, login_address_rate_limit=4) as (client, elsewhere):
        user = register(client)
        for _ in range(4):
            assert _login(client, unique("spray"), "Password123!").status_code == 401
        _assert_429(_login(client, unique("spray"), "Password123!"))
        _assert_429(_login(client, user.username, PASSWORD))  # even a right password, from this address
        # Another address and the account itself are fine (its own bucket was never hit).
        assert _login(elsewhere, user.username, PASSWORD).status_code == 200


def test_successful_logins_do_not_count_toward_the_address_limit(provisioned):
    """Many users behind one NAT address sign in fine; only failures count."""
    with limited_app(provisioned, login_address_rate_limit=2) as (client, _):
        users = [register(client) for _ in range(3)]
        for user in users * 2:
            assert _login(client, user.username, PASSWORD).status_code == 200


def test_parallel_guesses_cannot_all_slip_past_the_account_limit(provisioned):
    """Attempts are counted when they start: 12 guesses in flight at once get at most 3 password
    checks, the rest 429 (counting only finished failures would let all 12 through)."""
    app = create_app(make_settings(provisioned, login_rate_limit=3, password_hash_time_cost=2))

    async def burst(username: str) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            requests = [
                http.post("/api/v1/auth/login", json={"username": username, "password": f"guess-{i}-abcdef"})
                for i in range(12)
            ]
            return [r.status_code for r in await asyncio.gather(*requests)]

    with TestClient(app) as client:  # runs the lifespan (database) for the app
        user = register(client)
        statuses = asyncio.run(burst(user.username))
    assert sorted(statuses) == [401] * 3 + [429] * 9


def test_registrations_per_address_are_limited(provisioned):
    """Before: no limit at all on creating accounts."""
    with limited_app(provisioned, register_rate_limit=2, register_rate_window_seconds=3600) as (client, elsewhere):
        register(client)
        register(client)
        name = unique("reg")
        response = client.post(
            "/api/v1/auth/register", json={"username": name, "email": f"{name}@example.com", "password": PASSWORD}
        )
        wait = _assert_429(response)
        assert 3500 <= wait <= 3600
        assert "registrations" in response.json()["error"]["message"]
        register(elsewhere)  # another address still may


def test_a_refused_password_does_not_use_up_the_registration_limit(provisioned):
    with limited_app(provisioned, register_rate_limit=1) as (client, _):
        name = unique("reg")
        body = {"username": name, "email": f"{name}@example.com", "password": "password123"}
        for _ in range(3):
            assert client.post("/api/v1/auth/register", json=body).status_code == 422
        register(client)


@pytest.mark.parametrize("limit", [1, 3])
def test_limiter_acquire_counts_attempts_and_reports_the_wait(limit):
    now = [100.0]
    limiter = SlidingWindowLimiter(limit, 10, clock=lambda: now[0], max_keys=2)
    for _ in range(limit):
        assert limiter.acquire("k") is None
    assert limiter.acquire("k") == 10
    now[0] += 4
    assert limiter.acquire("k") == 6 and limiter.retry_after("k") == 6
    now[0] += 6
    assert limiter.acquire("k") is None
    limiter.hit(("a", 1))
    limiter.hit(("b", 2))  # beyond max_keys: the oldest key is dropped
    assert "k" not in limiter._hits and len(limiter._hits) == 2
