"""Circuit breakers per (tenant, agent, endpoint): stop calling a model that keeps failing.

Without one, an agent whose model hangs costs every one of its messages a full timeout, holds call
slots the whole time, and its streams' later messages wait behind each hang. A breaker counts
consecutive failed messages (after the provider's own retries; a timeout is a failure) of one agent on
one endpoint and model:

* closed: calls go through; `failures` consecutive failures open it;
* open: no call is made; the message is answered with the fallback at once (`BreakerOpen`);
* half-open: after `cooldown` seconds one message (the probe) calls the model while the others still
  get the fallback; its success closes the breaker, its failure opens it for another cool-down.

Calls that never reached the model (no free slot before the deadline, cancelled) count neither way.
Only breakers with something to remember are stored (a failure count or an open state), and at most
`max_entries` of them (the oldest forgotten first), so the memory is bounded whatever the tenants do.
A line is logged when a breaker opens or closes, throttled per (tenant, agent) (`ThrottledLog`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from isolation.logthrottle import ThrottledLog
from replier.llm.base import LlmError

log = logging.getLogger("replier.llm.breaker")


class BreakerOpen(LlmError):
    """The agent's breaker is open: its model is not called and the fallback reply is sent."""


@dataclass(frozen=True, slots=True)
class BreakerKey:
    """Which breaker: the tenant and agent, and the endpoint's full identity (URL, key hash, model)."""

    tenant_id: str
    agent_id: str
    base_url: str
    key_hash: str
    model: str

    @classmethod
    def of(cls, tenant_id: str, agent_id: str, base_url: str | None, api_key: str | None, model: str) -> BreakerKey:
        key_hash = hashlib.sha256((api_key or "").encode()).hexdigest()[:32]
        return cls(tenant_id, agent_id, base_url or "", key_hash, model)


@dataclass(slots=True)
class _State:
    failures: int = 0
    open: bool = False
    opened_at: float = 0.0
    probing: bool = False


class Breakers:
    """Every agent's breaker state (only breakers that are not plainly closed with no failure)."""

    def __init__(
        self,
        failures: int = 5,
        cooldown: float = 30.0,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = 60.0,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.failures = failures
        self.cooldown = cooldown
        self.max_entries = max_entries
        self.clock = clock
        self._states: OrderedDict[BreakerKey, _State] = OrderedDict()
        self._log = ThrottledLog(log, log_interval, logging.WARNING)
        self.opened_total = 0
        self.closed_total = 0
        self.rejected_total = 0

    def state(self, key: BreakerKey) -> str:
        """ "closed", "open" or "half_open" (a probe is in flight)."""
        state = self._states.get(key)
        if state is None or not state.open:
            return "closed"
        return "half_open" if state.probing else "open"

    def admit(self, key: BreakerKey) -> bool:
        """Whether a call may be made now: False when closed (an ordinary call), True for the
        half-open probe; `BreakerOpen` (counted in `rejected_total`) when the model must not be called."""
        state = self._states.get(key)
        if state is None or not state.open:
            return False
        if not state.probing and self.clock() - state.opened_at >= self.cooldown:
            state.probing = True
            return True
        self.rejected_total += 1
        raise BreakerOpen(f"breaker_open: {state.failures} consecutive failures, model not called")

    def check(self, key: BreakerKey, probe: bool) -> None:
        """`BreakerOpen` if the breaker opened since `admit` (a call that waited for a slot meanwhile)."""
        if probe:
            return
        state = self._states.get(key)
        if state is not None and state.open:
            self.rejected_total += 1
            raise BreakerOpen(f"breaker_open: {state.failures} consecutive failures, model not called")

    def success(self, key: BreakerKey, probe: bool) -> None:
        state = self._states.pop(key, None)
        if state is not None and state.open:
            self.closed_total += 1
            self._log.log("closed", f"{key.tenant_id}/{key.agent_id}",
                          "LLM breaker closed for tenant %s agent %s (model %s answers again)",
                          key.tenant_id, key.agent_id, key.model)  # fmt: skip

    def failure(self, key: BreakerKey, probe: bool) -> None:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
            self._bound()
        else:
            self._states.move_to_end(key)
        state.failures += 1
        if probe or (not state.open and state.failures >= self.failures):
            was_open = state.open
            state.open, state.probing, state.opened_at = True, False, self.clock()
            if not was_open:
                self.opened_total += 1
                self._log.log("opened", f"{key.tenant_id}/{key.agent_id}",
                              "LLM breaker OPEN for tenant %s agent %s after %d consecutive failures of model %s:"
                              " fallback replies for %g s, then one probe",
                              key.tenant_id, key.agent_id, state.failures, key.model, self.cooldown)  # fmt: skip

    def abandon(self, key: BreakerKey, probe: bool) -> None:
        """A call that never reached the model: it counts neither way; a probe lets the next one probe."""
        state = self._states.get(key)
        if probe and state is not None:
            state.probing = False

    def open_by_tenant(self) -> Counter[str]:
        """How many breakers are open (or half-open) per tenant, for the metrics."""
        return Counter(key.tenant_id for key, state in self._states.items() if state.open)

    def __len__(self) -> int:
        return len(self._states)

    def _bound(self) -> None:
        while len(self._states) > self.max_entries:
            self._states.popitem(last=False)
