"""One message's model calls with its tenant's fair share, its agent's breaker and one deadline.

`LlmGuard.call(provider, config, tenant, agent)` gives the `GuardedCall` that `Answerer` uses for the
reply and then the memory extraction of one message:

* the reply call goes through the agent's breaker (`replier.llm.breaker`): while it is open the
  model is not called and `BreakerOpen` says so at once (the caller sends the fallback reply);
* both calls share one deadline, set when the message starts (`LLM_DEADLINE_SECONDS`, or the agent's
  timeout plus a quarter of it, at least one second more): the slot wait, every retry and the
  extraction all fit in it, so a hanging model costs a message one timeout, never three;
* the extraction is skipped unless the breaker is closed and time is left; its failure does not count
  against the breaker (the reply call just succeeded).

The offline provider is called as is: it has no endpoint to protect.
"""

from __future__ import annotations

import asyncio
import time

from replier.llm.base import LlmRequest, LlmResult, Provider, ProviderConfig
from replier.llm.breaker import BreakerKey, BreakerOpen, Breakers
from replier.llm.fairness import SlotTimeout


def deadline_seconds(timeout: float, configured: float) -> float:
    """The total time for one message's calls: `configured` when set, else the single-call timeout
    plus a quarter (at least one second): enough for one attempt and a quick retry of a fast error."""
    if configured > 0:
        return configured
    return timeout + max(1.0, timeout / 4)


class GuardedCall:
    def __init__(
        self, provider: Provider, breakers: Breakers, key: BreakerKey | None, tenant: str, deadline: float
    ) -> None:
        self.provider = provider
        self.breakers = breakers
        self.key = key
        self.tenant = tenant
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _bind(self, request: LlmRequest, probe: bool) -> None:
        request.tenant = self.tenant
        request.deadline = self.deadline
        key = self.key
        if key is not None:
            request.gate = lambda: self.breakers.check(key, probe)

    async def complete(self, request: LlmRequest) -> LlmResult:
        """The reply; `BreakerOpen` without calling the model when the breaker is open."""
        if self.key is None:
            return await self.provider.complete(request)
        probe = self.breakers.admit(self.key)
        self._bind(request, probe)
        try:
            result = await self.provider.complete(request)
        except (BreakerOpen, SlotTimeout, asyncio.CancelledError):
            self.breakers.abandon(self.key, probe)  # the model was not called (or we stopped waiting)
            raise
        except Exception:
            self.breakers.failure(self.key, probe)
            raise
        self.breakers.success(self.key, probe)
        return result

    async def extract_memory(self, request: LlmRequest, reply: str) -> str | None:
        """A memory line from the model, or None: skipped while the breaker is not closed or no time is left."""
        if self.key is None:
            return await self.provider.extract_memory(request, reply)
        if self.breakers.state(self.key) != "closed" or self.left() <= 0:
            return None
        self._bind(request, False)
        return await self.provider.extract_memory(request, reply)


class LlmGuard:
    """The breakers of every agent and the deadline rule, for `replier.answer.Answerer`."""

    def __init__(self, breakers: Breakers, deadline: float = 0.0) -> None:
        self.breakers = breakers
        self.deadline = deadline

    def call(self, provider: Provider, config: ProviderConfig, tenant_id: str, agent_id: str) -> GuardedCall:
        deadline = time.monotonic() + deadline_seconds(config.timeout, self.deadline)
        if provider.offline:
            return GuardedCall(provider, self.breakers, None, tenant_id, deadline)
        key = BreakerKey.of(tenant_id, agent_id, config.base_url, config.api_key, config.model)
        return GuardedCall(provider, self.breakers, key, tenant_id, deadline)
