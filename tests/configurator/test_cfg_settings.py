"""Settings and start-up checks: production refuses the default secret; unknown schemas refuse to start."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from configurator.core.config import Settings
from configurator.core.db import init_database
from configurator.core.ratelimit import SlidingWindowLimiter
from configurator.main import create_app
from isolation.crypto import DEV_SECRET_KEY
from isolation.errors import SchemaVersionError


def test_production_refuses_the_default_secret():
    with pytest.raises(ValidationError, match="refuses the default SECRET_KEY"):
        Settings(environment="production", secret_key=DEV_SECRET_KEY)
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(environment="production", secret_key="short-but-not-default")
    ok = Settings(environment="production", secret_key="p" * 40)
    assert ok.environment == "production"
    assert Settings(environment="development").secret_key == DEV_SECRET_KEY


def test_main_prints_a_clear_error_for_production_default_secret():
    env = {**os.environ, "ENVIRONMENT": "production", "SECRET_KEY": DEV_SECRET_KEY, "PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "configurator"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refuses the default SECRET_KEY" in result.stderr


def _empty_sqlite_url() -> str:
    folder = tempfile.mkdtemp(prefix="cfg-empty-")
    return f"sqlite:///{folder}/empty.db"


def test_app_refuses_to_start_on_an_unmigrated_database(client, settings):
    app = create_app(Settings(database_url=_empty_sqlite_url()))
    try:
        with pytest.raises(SchemaVersionError, match="invoke db-upgrade"), TestClient(app):
            pass
    finally:
        init_database(settings)  # the database is process-wide: point it back at the suite's
    assert client.get("/health").status_code == 200


def test_main_refuses_an_unmigrated_database_with_the_command_to_run():
    env = {**os.environ, "DATABASE_URL": _empty_sqlite_url(), "PORT": "0"}
    env.pop("ENVIRONMENT", None)
    result = subprocess.run([sys.executable, "-m", "configurator"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invoke db-upgrade" in result.stderr and "python -m isolation upgrade" in result.stderr


def test_health_reports_the_database(client, settings):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": settings.resolved_database_url.split(":")[0],
        "schema_version": response.json()["schema_version"],
    }
    assert response.json()["schema_version"] >= 1


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    assert "/api/v1/agents/{agent_id}" in schema["paths"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    # FastAPI's own 422 shape is replaced by the common error body in the schema too
    post = schema["paths"]["/api/v1/agents"]["post"]["responses"]["422"]
    assert post["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert client.get("/docs").status_code == 200


def test_sliding_window_limiter_forgets_old_attempts():
    now = [1000.0]
    limiter = SlidingWindowLimiter(2, 10, clock=lambda: now[0], max_keys=2)
    key = ("alice", "1.2.3.4")
    limiter.hit(key)
    limiter.hit(key)
    assert limiter.retry_after(key) == 10
    now[0] += 4
    assert limiter.retry_after(key) == 6
    now[0] += 6.5
    assert limiter.retry_after(key) is None
    # bounded memory: the oldest key is dropped beyond max_keys
    limiter.hit(("a", "x"))
    limiter.hit(("b", "x"))
    limiter.hit(("c", "x"))
    limiter.hit(("c", "x"))
    assert limiter.retry_after(("c", "x")) is not None
    assert ("a", "x") not in limiter._hits


def test_health_is_503_when_the_database_does_not_answer(client, monkeypatch):
    import configurator.api.routes.health as health_route

    def broken():
        raise OSError("connection refused")

    monkeypatch.setattr(health_route, "ping", broken)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "unavailable",
        "message": "database not reachable",
        "details": {"reason": "OSError"},
    }
