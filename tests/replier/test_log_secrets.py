"""No secret in any log line, at any level: real configurator and replier processes at LOG_LEVEL=debug.

A user registers, logs in and out, creates an agent with an LLM key and an API key, and connects
maim_message's own client with the key in its headers and once (as maim's external-client guide shows)
in the URL's query string, which the replier refuses. uvicorn logs that URL at INFO and the
configurator's access log shows query strings, so without the redacting filter
(isolation/logredact.py) the API key and tokens sent in query strings are in the logs.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from adapter_support import NapcatLikeAdapter, media, onebot_message
from maim_message import Seg as LegacySeg
from replier_support import MaimClient, ReplierProcess, api_message, make_tenant, run, socketio_connect

from testsupport.servers import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Pw-" + uuid.uuid4().hex  # unique: any occurrence in a log is this test's password
LLM_KEY = "sk-llm-" + uuid.uuid4().hex
# Everything at DEBUG; cheap password hashing; agents' fake LLM on loopback allowed (isolation/egress.py).
DEBUG_SETTINGS = {
    "HOST": "127.0.0.1",
    "ENVIRONMENT": "development",
    "LOG_LEVEL": "debug",
    "PASSWORD_HASH_TIME_COST": "1",
    "PASSWORD_HASH_MEMORY_KIB": "8192",
    "LLM_ALLOWED_HOSTS": "127.0.0.1",
}


class ConfiguratorProcess(ServerProcess):
    """`python -m configurator` at LOG_LEVEL=debug on a free port, its output in a temporary file."""

    def __init__(self, database_url: str, app_role: str | None) -> None:
        self.port = free_port()
        env = {**os.environ, **DEBUG_SETTINGS, "PORT": str(self.port), "DATABASE_URL": database_url}
        if app_role:
            env["DATABASE_APP_ROLE"] = app_role
        fd, log_path = tempfile.mkstemp(prefix="configurator-", suffix=".log")
        os.close(fd)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "configurator"]
        super().__init__("configurator", cmd, env=env, log_path=log_path, health_url=f"{self.url}/health", cwd=ROOT)


@pytest.fixture(scope="module")
def keyless_key(configured_db) -> Iterator[tuple[str, Path]]:
    """An agent's key for the replier's keyless listener, in an owner-only file (issue 14)."""
    secret = make_tenant().secret
    fd, name = tempfile.mkstemp(prefix="keyless-", suffix=".key")
    os.write(fd, secret.encode())
    os.close(fd)
    yield secret, Path(name)
    Path(name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def debug_servers(provisioned, configured_db, keyless_key) -> Iterator[tuple[ConfiguratorProcess, ReplierProcess]]:
    configurator = ConfiguratorProcess(provisioned.url, provisioned.app_role)
    replier = ReplierProcess(
        provisioned.url,
        provisioned.app_role,
        LOG_LEVEL="debug",
        KEYLESS_LISTEN=f"127.0.0.1:{free_port()}",
        KEYLESS_API_KEY_FILE=str(keyless_key[1]),
    )
    try:
        configurator.start()
        configurator.wait_healthy(30)
        replier.start()
        yield configurator, replier
    finally:
        configurator.stop()
        replier.stop()
        for server in (configurator, replier):
            if server.log_path is not None:
                server.log_path.unlink(missing_ok=True)


def _user_session(http: httpx.Client, fake_llm) -> dict[str, str]:
    """Register, log in, create an agent (with an LLM key) and an API key, use the tokens in query
    strings too, log out; returns every secret that went over the wire."""
    name = "logscan" + uuid.uuid4().hex[:8]
    body = {"username": name, "email": f"{name}@example.com", "password": PASSWORD}
    registered = http.post("/api/v1/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    login = http.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert login.status_code == 200, login.text
    tokens = login.json()["tokens"]
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    llm = {"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-echo", "api_key": LLM_KEY}
    agent = http.post("/api/v1/agents", json={"name": "scan", "llm": llm}, headers=auth)
    assert agent.status_code == 201, agent.text
    agent_id = agent.json()["id"]
    key = http.post(f"/api/v1/agents/{agent_id}/api-keys", json={"name": "scan"}, headers=auth)
    assert key.status_code == 201, key.text
    secret = key.json()["secret"]
    # Clients do put credentials in URLs: the access log must not keep them.
    http.get("/api/v1/auth/me", params={"access_token": tokens["access_token"], "apikey": secret})
    assert http.post("/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}).status_code == 204
    old = registered.json()["tokens"]
    return {
        "password": PASSWORD,
        "llm key": LLM_KEY,
        "api key": secret,
        "access token": tokens["access_token"],
        "refresh token": tokens["refresh_token"],
        "first access token": old["access_token"],
        "first refresh token": old["refresh_token"],
    }


async def _chat(replier: ReplierProcess, secret: str) -> dict | None:
    """maim's client with the key in its headers and (as maim's external-client guide shows) in the
    URL's query too: answered, the URL logged redacted. Then a connect with the key in the query only:
    refused with a clear reason (the refusal returned)."""
    for url in (replier.url, f"{replier.url}?apikey={secret}"):
        client = await MaimClient(url, secret).start()
        try:
            await client.send(api_message("hello from the log scan", user_id="scanner"))
            await client.reply()
        finally:
            await client.stop()
    return await socketio_connect(replier.url, {"x-platform": "qq"}, f"&api_key={secret}")


async def _keyless_chat(replier: ReplierProcess) -> None:
    """A MaiBot-Napcat-Adapter-like client without a key on the keyless listener, with an image."""
    port = replier.env["KEYLESS_LISTEN"].rsplit(":", 1)[1]
    adapter = await NapcatLikeAdapter(f"ws://127.0.0.1:{port}/ws").start()
    try:
        data, _ = media(30_000)
        await adapter.send(onebot_message(1, [LegacySeg("text", "scan"), LegacySeg("image", data)]))
        await adapter.next()
    finally:
        await adapter.stop()


def test_no_secret_reaches_any_log_at_debug(debug_servers, fake_llm, keyless_key) -> None:
    configurator, replier = debug_servers
    with httpx.Client(base_url=configurator.url, timeout=30) as http:
        secrets = _user_session(http, fake_llm)
    secrets["keyless listener's key"] = keyless_key[0]
    run(_keyless_chat(replier))
    refusal = run(_chat(replier, secrets["api key"]))
    assert refusal is not None and "query string" in refusal["message"]  # a clear reason, not "missing api key"
    assert any(r.get("messages") for r in fake_llm.requests)  # the agent's LLM (and its key) was used
    configurator.stop()
    replier.stop()
    logs = {server.name: server.log_path.read_text(encoding="utf-8", errors="replace") for server in debug_servers}
    assert " DEBUG " in logs["replier"] and " DEBUG " in logs["configurator"]
    leaks = [
        f"{what} in the {name} log"
        for name, text in logs.items()
        for what, secret in secrets.items()
        if secret and secret in text
    ]
    assert not leaks, leaks
    # Nothing shaped like a key or a JWT either, whoever it belongs to (redacted ones are kept short).
    text = "".join(logs.values())
    assert not re.findall(r"mtk_[A-Za-z0-9_-]{12,}", text)
    assert not re.findall(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", text)
    assert "KEYLESS LISTENER on 127.0.0.1:" in logs["replier"]
    # The query strings were logged (so the scan looked at the lines that used to leak), redacted.
    assert "apikey=[redacted]" in logs["replier"] and "access_token=[redacted]" in logs["configurator"]
    assert "mtk_" + secrets["api key"][4:12] not in "".join(logs.values())
