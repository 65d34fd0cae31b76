"""Provider instances shared by every agent with the same endpoint and key.

One provider per endpoint identity (base URL, hash of the key, trust) means one bound on concurrent
calls and one connection pool per endpoint, shared fairly between tenants by its `FairScheduler`
(`replier.llm.fairness`); the key itself is never part of a registry key, only its hash.

Tenants choose their own endpoints and keys, so the number of identities is theirs to grow: a tenant
that changes its agent's key in a loop would otherwise leave one provider (and its connection pool)
behind per key, for ever. The registry keeps at most `max_providers` (`LLM_MAX_PROVIDERS`): beyond
that, the least recently used idle ones (no call running or waiting) are dropped and closed once they
have stayed idle for `CLOSE_AFTER_IDLE_SECONDS` (a caller that has just been handed one has that long
to start its call); a provider in use is never dropped, so the bound is the cap plus those in use.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from isolation.egress import EgressSettings
from replier.llm.base import ProviderConfig
from replier.llm.guard import Resolver
from replier.llm.offline import OfflineProvider
from replier.llm.openai import OpenAIProvider

CLOSE_AFTER_IDLE_SECONDS = 30.0


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
        max_providers: int = 256,
    ) -> None:
        """`concurrency` calls per endpoint, `tenant_concurrency` of them per tenant (0: half);
        `egress` (default: the environment's) and `resolver` go to every provider's egress check;
        at most `max_providers` idle providers are kept (least recently used dropped first)."""
        if max_providers < 1:
            raise ValueError("max_providers must be at least 1")
        self.max_providers = max_providers
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.tenant_concurrency = tenant_concurrency
        self.egress = egress
        self.resolver = resolver
        self.offline = OfflineProvider()
        self._providers: OrderedDict[tuple[str, str, bool], OpenAIProvider] = OrderedDict()
        self._closing: dict[asyncio.Task, OpenAIProvider] = {}
        self.dropped = 0  # providers dropped for the bound (closed once idle long enough)

    def __len__(self) -> int:
        return len(self._providers)

    def get(self, config: ProviderConfig):
        if config.kind != "openai":
            return self.offline
        key_hash = hashlib.sha256((config.api_key or "").encode()).hexdigest()
        key = (config.base_url or "", key_hash, config.trusted)
        provider = self._providers.get(key)
        if provider is not None:
            self._providers.move_to_end(key)
        else:
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
            self._bound()
        return provider

    def _bound(self) -> None:
        """Drop the least recently used idle providers beyond `max_providers` (never the newest)."""
        excess = len(self._providers) - self.max_providers
        if excess <= 0:
            return
        for key in list(self._providers)[:-1]:
            if excess <= 0:
                break
            provider = self._providers[key]
            if not _idle(provider):
                continue
            del self._providers[key]
            excess -= 1
            self.dropped += 1
            task = asyncio.get_running_loop().create_task(_close_when_idle(provider))
            self._closing[task] = provider
            task.add_done_callback(self._closing.pop)

    async def aclose(self) -> None:
        closing = dict(self._closing)
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        for provider in [*self._providers.values(), *closing.values()]:
            await provider.aclose()  # idempotent: a dropped one may be closed already
        self._providers.clear()


def _idle(provider: OpenAIProvider) -> bool:
    scheduler = provider.scheduler
    return scheduler.in_use == 0 and scheduler.tenants_known == 0


async def _close_when_idle(provider: OpenAIProvider) -> None:
    """Close a dropped provider once it has stayed idle for `CLOSE_AFTER_IDLE_SECONDS` (a call handed
    it just before it was dropped finishes first). At shutdown `ProviderRegistry.aclose` closes it."""
    while True:
        await asyncio.sleep(CLOSE_AFTER_IDLE_SECONDS)
        if _idle(provider):
            await provider.aclose()
            return
