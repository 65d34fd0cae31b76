"""`python -m configurator` as a real uvicorn process: X-Forwarded-For only from configured proxies.

uvicorn's own defaults trust X-Forwarded-For from loopback, so anyone able to reach the server from
its host (or through a proxy on it that passes the header on) chose the address the login limits
count: rotating the header escaped the 429 (finding 4).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from cfg_helpers import PASSWORD, server_env, unique

from configurator.__main__ import uvicorn_options
from configurator.core.config import Settings
from testsupport.servers import free_port, healthy, running_server


@contextmanager
def configurator(provisioned, log_path: Path, **settings: str) -> Iterator[httpx.Client]:
    port = free_port()
    env = server_env(provisioned, port, LOGIN_RATE_LIMIT="3", LOGIN_ADDRESS_RATE_LIMIT="4", **settings)
    base = f"http://127.0.0.1:{port}"
    with (
        running_server(
            [sys.executable, "-m", "configurator"], env=env, ready_url=f"{base}/health", log_path=log_path,
            ok=healthy, name="configurator", stop_timeout=20,
        ),
        httpx.Client(base_url=base, timeout=10) as http,
    ):  # fmt: skip
        yield http


def _register(http: httpx.Client) -> str:
    name = unique("px")
    body = {"username": name, "email": f"{name}@example.com", "password": PASSWORD}
    assert http.post("/api/v1/auth/register", json=body).status_code == 201
    return name


def _login(http: httpx.Client, username: str, password: str, forwarded_for: str) -> int:
    body = {"username": username, "password": password}
    return http.post("/api/v1/auth/login", json=body, headers={"X-Forwarded-For": forwarded_for}).status_code


def test_rotating_x_forwarded_for_does_not_escape_the_limits_by_default(provisioned, tmp_path):
    with configurator(provisioned, tmp_path / "server.log") as http:
        victim = _register(http)
        statuses = [_login(http, victim, "wrong-password-1", f"203.0.113.{i}") for i in range(1, 4)]
        assert statuses == [401, 401, 401]
        # Before: each new header value was a new (username, address) bucket, and the right password
        # with a fresh value logged in during the lockout.
        assert _login(http, victim, "wrong-password-1", "203.0.113.50") == 429
        assert _login(http, victim, PASSWORD, "203.0.113.51") == 429
        # Other usernames, rotating the header: all from 127.0.0.1, which has 3 failures already, so
        # one more fails and then the address limit (4) answers.
        sprayed = [_login(http, unique("nobody"), "Password123!", f"198.51.100.{i}") for i in range(1, 5)]
        assert sprayed == [401, 429, 429, 429]


def test_x_forwarded_for_is_honoured_from_the_configured_proxy(provisioned, tmp_path):
    """FORWARDED_ALLOW_IPS=127.0.0.1: the proxy's header names the client, each client has its own
    address limit, and the account limit still spans all of them."""
    with configurator(provisioned, tmp_path / "server.log", FORWARDED_ALLOW_IPS="127.0.0.1") as http:
        for _ in range(4):
            assert _login(http, unique("nobody"), "Password123!", "203.0.113.7") == 401
        assert _login(http, unique("nobody"), "Password123!", "203.0.113.7") == 429
        assert _login(http, unique("nobody"), "Password123!", "203.0.113.8") == 401  # another client
        user = _register(http)
        assert _login(http, user, PASSWORD, "203.0.113.9") == 200


def test_uvicorn_options_trust_proxy_headers_only_when_configured():
    for unset in (None, "", "   "):
        options = uvicorn_options(Settings(forwarded_allow_ips=unset))
        assert options["proxy_headers"] is False and options["forwarded_allow_ips"] is None
    options = uvicorn_options(Settings(forwarded_allow_ips=" 10.0.0.0/8,127.0.0.1 "))
    assert options["proxy_headers"] is True and options["forwarded_allow_ips"] == "10.0.0.0/8,127.0.0.1"
    assert options["server_header"] is False
