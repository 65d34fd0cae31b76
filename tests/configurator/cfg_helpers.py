"""Helpers of the configurator suite (imported by its tests; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from fastapi.testclient import TestClient

from configurator.core.config import Settings
from isolation import IsolationContext, Scoped

PASSWORD = "correct horse battery"
TEST_SECRET = "test-secret-key-for-the-configurator-suite-0123456789"


def server_env(provisioned, port: int, **settings: str) -> dict[str, str]:
    """The environment of a configurator subprocess on `port` with fast password hashing.

    `ENVIRONMENT` and `FORWARDED_ALLOW_IPS` of the calling shell are dropped unless passed in
    `settings`: a test states the deployment it runs.
    """
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "FORWARDED_ALLOW_IPS")},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": provisioned.url,
        "SECRET_KEY": TEST_SECRET,
        "PASSWORD_HASH_TIME_COST": "1",
        "PASSWORD_HASH_MEMORY_KIB": "8192",
        **settings,
    }
    if provisioned.app_role:
        env["DATABASE_APP_ROLE"] = provisioned.app_role
    return env


def make_settings(provisioned, **overrides) -> Settings:
    values = {
        "database_url": provisioned.url,
        "secret_key": TEST_SECRET,
        # Cheap Argon2 parameters keep the suite fast; the algorithm and code path are the real ones.
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 8192,
        "login_rate_limit": 5,
        "login_rate_window_seconds": 60,
        # The whole suite signs up and fails logins from one test client: the per-address limits
        # have tests of their own, on apps of their own (test_cfg_limits.py).
        "login_address_rate_limit": 1_000_000,
        "register_rate_limit": 1_000_000,
        "max_body_bytes": 64 * 1024,
    }
    if provisioned.app_role:  # PostgreSQL: the suite's role; SQLite has none (the setting's default is unused)
        values["database_app_role"] = provisioned.app_role
    values.update(overrides)
    return Settings(**values)


@dataclass
class User:
    username: str
    email: str
    password: str
    account_id: str
    tenant_id: str
    access_token: str
    refresh_token: str
    role: str = "owner"
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    @property
    def ctx(self) -> IsolationContext:
        return IsolationContext(self.tenant_id)


def unique(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(5)}"


def register(client: TestClient, prefix: str = "u", **extra) -> User:
    username = unique(prefix)
    body = {"username": username, "email": f"{username}@example.com", "password": PASSWORD, **extra}
    response = client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 201, response.text
    data = response.json()
    return User(
        username=username,
        email=body["email"],
        password=PASSWORD,
        account_id=data["account"]["id"],
        tenant_id=data["tenant"]["id"],
        access_token=data["tokens"]["access_token"],
        refresh_token=data["tokens"]["refresh_token"],
    )


def login(client: TestClient, username: str, password: str = PASSWORD, tenant_id: str | None = None) -> dict:
    body = {"username": username, "password": password}
    if tenant_id:
        body["tenant_id"] = tenant_id
    response = client.post("/api/v1/auth/login", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def member_of(client: TestClient, owner: User, role: str) -> User:
    """A new account added to `owner`'s tenant with `role`, signed in to that tenant."""
    user = register(client, prefix=role[:3])
    Scoped(owner.ctx).memberships.add(user.account_id, role)
    data = login(client, user.username, tenant_id=owner.tenant_id)
    user.tenant_id = owner.tenant_id
    user.access_token = data["tokens"]["access_token"]
    user.refresh_token = data["tokens"]["refresh_token"]
    user.role = role
    return user


def create_agent(client: TestClient, user: User, **body) -> dict:
    body.setdefault("name", unique("agent-"))
    response = client.post("/api/v1/agents", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


def create_key(client: TestClient, user: User, agent_id: str, **body) -> dict:
    response = client.post(f"/api/v1/agents/{agent_id}/api-keys", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


def seed_history(user: User, agent_id: str, *, messages: int = 3, platform: str = "qq", group: str = "42") -> dict:
    """A chat stream with messages, a chat memory and an LLM usage row, as the replier would store them."""
    agent_ctx = user.ctx.child(agent_id=agent_id, platform=platform)
    stream = Scoped(agent_ctx).chat_streams.get_or_create(group_id=group)
    stream_ctx = agent_ctx.child(chat_stream_id=stream["id"])
    scoped = Scoped(stream_ctx)
    for i in range(messages):
        scoped.messages.add(message_id=f"m{i}", direction="in", text=f"hello {i}", segments=[{"type": "text"}])
    memory = scoped.memories.add("remembers the group", level="chat")
    scoped.llm_usage.record(provider="offline", model="offline", outcome="ok", prompt_tokens=10, completion_tokens=5)
    return {"stream": stream, "memory": memory}
