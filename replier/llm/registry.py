"""Provider instances shared by every agent with the same endpoint and key.

One provider per endpoint identity (base URL, hash of the key, trust) means one bound on concurrent
calls and one connection pool per endpoint, shared fairly between tenants by its `FairScheduler`
(`replier.llm.fairness`); the key itself is never part of a registry key, only its hash.
"""

from __future__ import annotations

import hashlib

from isolation.egress import EgressSettings
from replier.llm.base import ProviderConfig
from replier.llm.guard import Resolver
from replier.llm.offline import OfflineProvider
from replier.llm.openai import OpenAIProvider


def make_provider(
    kind: str,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
    max_retries: int = 2,
    backoff: float = 0.25,
    concurrency: int = 16,
    tenant_concurrency: int = 0,
    trusted: bool | None = None,
    egress: EgressSettings | None = None,
    resolver: Resolver | None = None,
):
    """A provider by kind ("openai" or "offline"); see `OpenAIProvider` for `trusted`, `egress` and
    `resolver`."""
    if kind == "offline":
        return OfflineProvider()
    if kind == "openai":
        if not base_url or not model:
            raise ValueError("the openai provider needs base_url and model")
        return OpenAIProvider(
            base_url,
            model=model,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            concurrency=concurrency,
            tenant_concurrency=tenant_concurrency,
            trusted=trusted,
            egress=egress,
            resolver=resolver,
        )
    raise ValueError(f"unknown provider {kind!r}")


class ProviderRegistry:
    def __init__(
        self,
        *,
        max_retries: int = 2,
        backoff: float = 0.25,
        concurrency: int = 16,
        tenant_concurrency: int = 0,
        egress: EgressSettings | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        """`concurrency` calls per endpoint, `tenant_concurrency` of them per tenant (0: half);
        `egress` (default: the environment's) and `resolver` go to every provider's egress check."""
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.tenant_concurrency = tenant_concurrency
        self.egress = egress
        self.resolver = resolver
        self.offline = OfflineProvider()
        self._providers: dict[tuple[str, str, bool], OpenAIProvider] = {}

    def get(self, config: ProviderConfig):
        if config.kind != "openai":
            return self.offline
        key_hash = hashlib.sha256((config.api_key or "").encode()).hexdigest()
        key = (config.base_url or "", key_hash, config.trusted)
        provider = self._providers.get(key)
        if provider is None:
            provider = make_provider(
                "openai",
                base_url=config.base_url,
                model=config.model,
                api_key=config.api_key,
                timeout=config.timeout,
                max_retries=self.max_retries,
                backoff=self.backoff,
                concurrency=self.concurrency,
                tenant_concurrency=self.tenant_concurrency,
                trusted=config.trusted,
                egress=self.egress,
                resolver=self.resolver,
            )
            self._providers[key] = provider
        return provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
