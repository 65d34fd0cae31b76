"""`python -m configurator` as a real uvicorn process: register → create agent → create key over HTTP."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import pytest
from cfg_helpers import server_env

from isolation import system
from testsupport.servers import free_port, healthy, running_server


@pytest.fixture
def server(provisioned, tmp_path: Path):
    port = free_port()
    env = server_env(provisioned, port, LOG_LEVEL="debug")
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with running_server(
        [sys.executable, "-m", "configurator"], env=env, ready_url=f"{base}/health", log_path=log_path,
        ok=healthy, name="configurator", stop_timeout=20,
    ) as running:  # fmt: skip
        yield base, running.process, log_path


def test_real_server_register_agent_key(server, client):
    """`client` only configures this process's database connection, to look the key up directly."""
    base, proc, log_path = server
    password = "server-test-password"
    with httpx.Client(base_url=base, timeout=10) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok"
        reg = http.post(
            "/api/v1/auth/register", json={"username": "srv_user", "email": "srv@example.com", "password": password}
        )
        assert reg.status_code == 201, reg.text
        headers = {"Authorization": f"Bearer {reg.json()['tokens']['access_token']}"}
        agent = http.post(
            "/api/v1/agents",
            json={"name": "server agent", "template_id": "efficient_helper", "llm": {"api_key": "sk-server-llm"}},
            headers=headers,
        )
        assert agent.status_code == 201, agent.text
        key = http.post(f"/api/v1/agents/{agent.json()['id']}/api-keys", json={"name": "bot"}, headers=headers)
        assert key.status_code == 201, key.text
        secret = key.json()["secret"]
        principal = system.lookup_api_key(secret)
        assert principal is not None and principal.agent_id == agent.json()["id"]
        listed = http.get(f"/api/v1/agents/{agent.json()['id']}/api-keys", headers=headers)
        assert listed.status_code == 200 and secret not in listed.text
        assert http.get("/api/v1/agents").status_code == 401
        too_big = http.post("/api/v1/agents", content=b"x" * (2 * 1024 * 1024), headers=headers)
        assert too_big.status_code == 413

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    log = log_path.read_text()
    assert "Application startup complete" in log and "Application shutdown complete" in log
    for value in (password, secret, "sk-server-llm"):
        assert value not in log
