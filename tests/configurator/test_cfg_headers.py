"""Security headers on every response, no-store on API responses, and the docs off in production."""

from __future__ import annotations

import secrets

import pytest
from cfg_helpers import PASSWORD, make_settings, unique
from fastapi.testclient import TestClient

from configurator.core.headers import API_CSP, DOCS_CSP
from configurator.main import create_app

COMMON = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def _has_common(response) -> None:
    for name, value in COMMON.items():
        assert response.headers.get(name) == value, (response.request.url, name)
    assert len(response.headers.get_list("x-frame-options")) == 1


def test_token_responses_are_never_stored_and_carry_the_security_headers(client):
    """Before: no X-Content-Type-Options and no Cache-Control: no-store on token responses."""
    username = unique("hdr")
    registered = client.post(
        "/api/v1/auth/register", json={"username": username, "email": f"{username}@example.com", "password": PASSWORD}
    )
    logged_in = client.post("/api/v1/auth/login", json={"username": username, "password": PASSWORD})
    refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": logged_in.json()["tokens"]["refresh_token"]})
    for response in (registered, logged_in, refreshed):
        assert response.status_code in (200, 201)
        assert "access_token" in response.text
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-security-policy"] == API_CSP
        _has_common(response)
    assert "strict-transport-security" not in refreshed.headers  # plain HTTP


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/agents", 401),
        ("GET", "/api/v1/no-such-route", 404),
        ("POST", "/api/v1/auth/login", 422),
        ("GET", "/health", 200),
        ("GET", "/nowhere", 404),
    ],
)
def test_every_response_has_the_headers_errors_included(client, method, path, status):
    response = client.request(method, path, json={} if method == "POST" else None)
    assert response.status_code == status
    _has_common(response)
    assert response.headers["content-security-policy"] == API_CSP
    assert ("cache-control" in response.headers) == path.startswith("/api/v1")


def test_oversized_bodies_and_unexpected_errors_have_the_headers_too(provisioned, settings):
    app = create_app(make_settings(provisioned))

    @app.get("/api/v1/crash")
    def crash():
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as tc:
        crashed = tc.get("/api/v1/crash")
        too_big = tc.post("/api/v1/auth/login", content=b"x" * (settings.max_body_bytes + 1))
    assert crashed.status_code == 500 and too_big.status_code == 413
    for response in (crashed, too_big):
        _has_common(response)
        assert response.headers["cache-control"] == "no-store"


def test_https_requests_get_hsts(client):
    with TestClient(client.app, base_url="https://testserver") as tls:
        response = tls.get("/health")
    assert response.headers["strict-transport-security"] == "max-age=31536000"


def test_docs_are_served_in_development_with_a_csp_that_lets_them_load(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert docs.headers["content-security-policy"] == DOCS_CSP
    assert "https://cdn.jsdelivr.net" in DOCS_CSP
    _has_common(docs)
    assert client.get("/redoc").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "MaiTenant configurator"


def _production(provisioned, **overrides):
    return make_settings(provisioned, environment="production", secret_key=secrets.token_urlsafe(48), **overrides)


def test_docs_and_schema_are_off_in_production_unless_enabled(provisioned):
    """Before: /docs and /openapi.json were served in production mode."""
    with TestClient(create_app(_production(provisioned))) as prod:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            response = prod.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-security-policy"] == API_CSP
        assert prod.get("/health").status_code == 200
    with TestClient(create_app(_production(provisioned, docs_enabled=True))) as documented:
        assert documented.get("/openapi.json").status_code == 200
        assert documented.get("/docs").headers["content-security-policy"] == DOCS_CSP
    with TestClient(create_app(make_settings(provisioned, docs_enabled=False))) as hidden:
        assert hidden.get("/docs").status_code == 404
