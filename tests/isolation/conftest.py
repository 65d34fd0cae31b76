"""Fixtures for the isolation suite: tenants with agents, built through the public API only."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import pytest

from isolation import IsolationContext, Scoped, system


@dataclass
class World:
    """Tenants, each with agents; ids only, everything else is read back through managers."""

    tenants: list[str] = field(default_factory=list)
    agents: dict[str, list[str]] = field(default_factory=dict)
    accounts: dict[str, str] = field(default_factory=dict)


def make_tenant(agents: int = 2, name: str | None = None) -> tuple[str, list[str], str]:
    suffix = secrets.token_hex(4)
    account = system.create_account(f"user_{suffix}", f"{suffix}@example.test", "not-a-real-hash")
    tenant = system.create_tenant(name or f"tenant_{suffix}", account["id"])
    scoped = Scoped(IsolationContext(tenant["id"]))
    agent_ids = [
        scoped.agents.create(name=f"agent{i}", persona={"personality": "p"}, config={}, llm={"provider": "offline"})[
            "id"
        ]
        for i in range(agents)
    ]
    return tenant["id"], agent_ids, account["id"]


def build_world(tenants: int = 3, agents: int = 2) -> World:
    world = World()
    for _ in range(tenants):
        tenant_id, agent_ids, account_id = make_tenant(agents)
        world.tenants.append(tenant_id)
        world.agents[tenant_id] = agent_ids
        world.accounts[tenant_id] = account_id
    return world


@pytest.fixture
def db(configured_db):
    return configured_db


@pytest.fixture
def world(db) -> World:
    return build_world()
