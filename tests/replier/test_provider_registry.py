"""The provider registry is bounded: tenants choose endpoints and keys, so a tenant cycling its
agent's key must not leave a provider and connection pool behind per key (replier/llm/registry.py)."""

from __future__ import annotations

import asyncio

import pytest

from isolation.egress import EgressSettings
from replier.llm import registry as registry_module
from replier.llm.base import ProviderConfig
from replier.llm.registry import ProviderRegistry

LOOPBACK = EgressSettings(llm_allowed_hosts="127.0.0.1")


def _config(key: str) -> ProviderConfig:
    return ProviderConfig("openai", "m", base_url="http://127.0.0.1:9/v1", api_key=key, trusted=True)


def test_a_tenant_cycling_keys_keeps_at_most_the_cap_and_dropped_clients_are_closed(monkeypatch):
    monkeypatch.setattr(registry_module, "CLOSE_AFTER_IDLE_SECONDS", 0.05)

    async def scenario():
        registry = ProviderRegistry(egress=LOOPBACK, max_providers=3)
        first = registry.get(_config("sk-0"))
        providers = [first] + [registry.get(_config(f"sk-{n}")) for n in range(1, 10)]
        assert len(registry) == 3 and registry.dropped == 7
        # the most recently used stay, and are the same objects when asked again
        assert registry.get(_config("sk-9")) is providers[9]
        await asyncio.sleep(0.3)
        assert all(p._client.is_closed for p in providers[:7])
        assert not any(p._client.is_closed for p in providers[7:])
        # a dropped identity comes back as a new, open provider
        again = registry.get(_config("sk-0"))
        assert again is not first and not again._client.is_closed
        await registry.aclose()
        assert all(p._client.is_closed for p in [*providers, again])

    asyncio.run(scenario())


def test_a_provider_in_use_is_never_dropped_and_a_recent_one_is_kept(monkeypatch):
    monkeypatch.setattr(registry_module, "CLOSE_AFTER_IDLE_SECONDS", 0.05)

    async def scenario():
        registry = ProviderRegistry(egress=LOOPBACK, max_providers=1)
        busy = registry.get(_config("sk-busy"))
        await busy.scheduler.acquire("t_1")  # a call is running on it
        other = registry.get(_config("sk-other"))
        assert len(registry) == 2 and registry.dropped == 0  # over the cap only by what is in use
        assert registry.get(_config("sk-busy")) is busy
        busy.scheduler.release("t_1")
        registry.get(_config("sk-third"))  # now the least recently used idle one goes
        assert registry.dropped == 2 and len(registry) == 1
        await asyncio.sleep(0.3)
        assert busy._client.is_closed and other._client.is_closed
        await registry.aclose()

    asyncio.run(scenario())


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="max_providers"):
        ProviderRegistry(max_providers=0)
