"""Settings and start-up checks: no public or short secret (a generated one by default); unknown schemas
refuse to start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile

import jwt as pyjwt
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from configurator.core.config import Settings
from configurator.core.db import init_database
from configurator.core.ratelimit import SlidingWindowLimiter
from configurator.core.security import ACCESS, ALGORITHM, TokenError, TokenService
from configurator.main import create_app
from isolation.errors import SchemaVersionError

PUBLIC_DEV_SECRET = "maitenant-development-secret-change-me"  # the default of earlier versions


def test_the_public_development_secret_and_short_keys_are_refused():
    for environment in ("development", "production"):
        with pytest.raises(ValidationError, match="public development value"):
            Settings(environment=environment, secret_key=PUBLIC_DEV_SECRET)
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(environment="production", secret_key="short-but-not-default")
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(environment="development", secret_key="short")
    ok = Settings(environment="production", secret_key="p" * 40)
    assert ok.environment == "production" and ok.secret_key == "p" * 40
    assert "p" * 40 not in repr(ok)


def test_both_backends_extend_one_settings_base(monkeypatch):
    """One base reads the shared names: the replier's settings refuse what the configurator's refuse."""
    from isolation.config import BaseServiceSettings
    from isolation.egress import EgressSettings
    from replier.core.config import ReplierSettings

    assert issubclass(Settings, BaseServiceSettings) and issubclass(ReplierSettings, EgressSettings)
    for backend in (Settings, ReplierSettings):
        with pytest.raises(ValidationError, match="public development value"):
            backend(_env_file=None, secret_key=PUBLIC_DEV_SECRET)
        with pytest.raises(ValidationError, match="at least 32"):
            backend(_env_file=None, environment="production", secret_key="s" * 20)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///shared.db")
    monkeypatch.setenv("LLM_ALLOWED_HOSTS", "10.0.0.7")
    replier = ReplierSettings(_env_file=None, secret_key="r" * 32)
    assert replier.database_url == Settings(_env_file=None, secret_key="c" * 32).database_url == "sqlite:///shared.db"
    assert replier.allowed.networks and "r" * 32 not in repr(replier)


def test_without_secret_key_the_generated_secret_of_data_dir_signs(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    for environment in ("development", "production"):
        settings = Settings(environment=environment)
        assert settings.secret_key == (tmp_path / "data" / "secret_key").read_text().strip()
    assert stat.S_IMODE((tmp_path / "data" / "secret_key").stat().st_mode) == 0o600
    # A token signed with the public value of earlier versions is refused by a default install.
    tokens = TokenService(settings)
    claims = pyjwt.decode(tokens.issue(ACCESS, "acc_x", "ten_x").token, options={"verify_signature": False})
    with pytest.raises(TokenError, match="invalid token"):
        tokens.decode(pyjwt.encode(claims, PUBLIC_DEV_SECRET, algorithm=ALGORITHM), ACCESS)
    assert tokens.decode(pyjwt.encode(claims, settings.secret_key, algorithm=ALGORITHM), ACCESS).tenant_id == "ten_x"
    (tmp_path / "data" / "secret_key").chmod(0o644)
    with pytest.raises(ValidationError, match="others may read it"):
        Settings()


def test_main_prints_a_clear_error_for_an_unusable_secret(tmp_path):
    env = {**os.environ, "ENVIRONMENT": "production", "SECRET_KEY": PUBLIC_DEV_SECRET, "PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "configurator"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configurator: invalid settings" in result.stderr and "public development value" in result.stderr
    (tmp_path / "secret_key").write_text("w" * 64)
    (tmp_path / "secret_key").chmod(0o604)
    env = {k: v for k, v in env.items() if k not in ("SECRET_KEY", "ENVIRONMENT")} | {"DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "configurator"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "has mode 0604: others may read it" in result.stderr and "w" * 64 not in result.stderr


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
        "database": settings.database_url.split(":")[0],
        "schema_version": response.json()["schema_version"],
        "checks": {"database": "ok", "write": "ok", "disk": "ok" if "sqlite" in settings.database_url else "skipped"},
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
    from isolation import db as isolation_db

    def broken(*args, **kwargs):
        raise OSError("connection refused")

    probe = client.app.state.health
    monkeypatch.setattr(probe, "ttl", 0)
    monkeypatch.setattr(isolation_db, "connection", broken)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "error: OSError"
    assert body["error"]["code"] == "unavailable"
    assert body["error"]["details"]["checks"]["database"] == "error: OSError"
