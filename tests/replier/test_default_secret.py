"""A default install (no SECRET_KEY): both backends share the secret generated in DATA_DIR, and no public value signs.

Real `python -m configurator` and `python -m replier` processes; the only test double is the LLM endpoint,
which records the bearer key it receives, so the test sees the replier decrypt what the configurator encrypted.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys

import httpx
import jwt
import pytest
from fake_openai import FakeOpenAI
from replier_support import MaimClient, ReplierProcess, api_message, run

from testsupport.servers import free_port, healthy, running_server

PUBLIC_DEV_SECRET = "maitenant-development-secret-change-me"  # the default of earlier versions
TENANT_LLM_KEY = "sk-tenant-own-key-" + secrets.token_hex(8)


@pytest.fixture
def recording_llm():
    """A fake LLM of this test's own: its `authorizations` hold only this test's bearer keys."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


def _default_install_env(provisioned, data_dir) -> dict[str, str]:
    """The environment of a default install: no SECRET_KEY, no ENVIRONMENT, no encryption key."""
    drop = {"SECRET_KEY", "ENVIRONMENT", "MAITENANT_ENCRYPTION_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LLM_")}
    env.update(
        DATA_DIR=str(data_dir),
        DATABASE_URL=provisioned.url,
        PASSWORD_HASH_TIME_COST="1",
        PASSWORD_HASH_MEMORY_KIB="8192",
        # The fake LLM listens on loopback, which agents' URLs may not reach unless the operator allows it.
        LLM_ALLOWED_HOSTS="127.0.0.1",
    )
    if provisioned.app_role:
        env["DATABASE_APP_ROLE"] = provisioned.app_role
    return env


def _resigned(token: str, key: str) -> str:
    """The same claims as `token`, signed with `key`: only the signing key differs."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, key, algorithm="HS256")


def test_both_backends_share_the_generated_secret_and_refuse_the_public_one(
    provisioned, configured_db, recording_llm, tmp_path, monkeypatch
):
    data_dir = tmp_path / "data"
    env = _default_install_env(provisioned, data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running_server(
        [sys.executable, "-m", "configurator"], env={**env, "PORT": str(port)}, ready_url=f"{base}/health",
        ok=healthy, name="configurator",
    ):  # fmt: skip
        secret_file = data_dir / "secret_key"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        generated = secret_file.read_text().strip()
        assert len(generated) == 64
        with httpx.Client(base_url=f"{base}/api/v1", timeout=30) as http:
            username = f"ds{secrets.token_hex(4)}"
            reg = http.post(
                "/auth/register",
                json={"username": username, "email": f"{username}@example.com", "password": secrets.token_urlsafe(18)},
            )
            assert reg.status_code == 201, reg.text
            access_token = reg.json()["tokens"]["access_token"]
            for key, status in ((PUBLIC_DEV_SECRET, 401), (generated, 200)):
                response = http.get("/auth/me", headers={"Authorization": f"Bearer {_resigned(access_token, key)}"})
                assert response.status_code == status, response.text
            headers = {"Authorization": f"Bearer {access_token}"}
            llm = {"provider": "openai", "base_url": recording_llm.base_url, "model": "fake-echo"}
            agent = http.post(
                "/agents", json={"name": "secret test", "llm": {**llm, "api_key": TENANT_LLM_KEY}}, headers=headers
            )
            assert agent.status_code == 201, agent.text
            key = http.post(f"/agents/{agent.json()['id']}/api-keys", json={"name": "bot"}, headers=headers)
            assert key.status_code == 201, key.text
            api_key = key.json()["secret"]

    monkeypatch.delenv("SECRET_KEY", raising=False)
    replier = ReplierProcess(
        provisioned.url, provisioned.app_role, **{k: env[k] for k in ("DATA_DIR", "LLM_ALLOWED_HOSTS")}
    )
    replier.env.pop("SECRET_KEY", None)
    replier.env.pop("MAITENANT_ENCRYPTION_KEY", None)
    replier.start()
    try:

        async def chat():
            client = await MaimClient(replier.url, api_key).start()
            try:
                await client.send(api_message("hello there", user_id="secret-user"))
                return await client.reply(timeout=20)
            finally:
                await client.stop()

        reply = run(chat())
    finally:
        replier.stop()
    assert reply.message_segment.data.startswith("LLM reply to:")
    # The replier decrypted the key the configurator stored, with the same generated secret.
    assert f"Bearer {TENANT_LLM_KEY}" in recording_llm.authorizations
    assert secret_file.read_text().strip() == generated  # nobody replaced it
    assert TENANT_LLM_KEY not in replier.logs() and generated not in replier.logs()


def test_the_replier_refuses_to_start_with_an_unusable_secret(provisioned, tmp_path):
    (tmp_path / "secret_key").write_text("r" * 64)
    (tmp_path / "secret_key").chmod(0o644)
    env = _default_install_env(provisioned, tmp_path) | {"PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "replier"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "replier: refusing to start" in result.stderr and "has mode 0644: others may read it" in result.stderr
    assert "r" * 64 not in result.stderr
    env["SECRET_KEY"] = PUBLIC_DEV_SECRET
    result = subprocess.run([sys.executable, "-m", "replier"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "public development value" in result.stderr
