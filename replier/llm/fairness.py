"""Fair sharing of one LLM endpoint's call slots between tenants.

Every agent whose provider resolves to the same endpoint (base URL, key hash, trust) shares one
`OpenAIProvider`, so one bound on concurrent calls and one HTTP connection pool: that protects the
endpoint (and the operator's key) from the replier. A plain semaphore lets one tenant take every slot,
and a call that hangs cannot be taken back: another tenant then waits for the hanging calls' timeouts.
`FairScheduler` hands the same slots out with two rules:

* a hard per-tenant cap (`tenant_cap`, default half the slots): whatever one tenant's model does, the
  other tenants keep at least `capacity - tenant_cap` slots, and calls cannot be preempted, so only a
  cap that holds at all times protects them;
* a fair queue: when no slot is free (or a tenant is at its cap), waiters queue per tenant and freed
  slots go round-robin to the tenants that are under their cap, so a tenant with 1,000 waiting calls
  and one with a single waiting call are served alternately, not in arrival order.

The wait for a slot is bounded by the caller's deadline (`SlotTimeout`). State exists only for tenants
holding or waiting for a slot: an idle tenant leaves nothing behind, so memory is bounded by the calls
in flight. Everything runs on the event loop (no locks needed).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from replier.llm.base import LlmError


class SlotTimeout(LlmError):
    """No call slot became free for this tenant before the message's deadline (the model was not called)."""


def tenant_cap(capacity: int, configured: int) -> int:
    """The per-tenant cap: `configured` when set (0 = half the slots, at least 1), never above `capacity`."""
    cap = configured if configured > 0 else capacity // 2
    return max(1, min(cap, capacity))


class FairScheduler:
    """`capacity` call slots shared by tenants, at most `cap` per tenant, freed slots handed out round-robin."""

    def __init__(self, capacity: int, cap: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.cap = max(1, min(cap, capacity))
        self.in_use = 0
        self._active: dict[str, int] = {}  # tenant -> slots held (only tenants holding one)
        # tenant -> its waiters, oldest first; the dict's order is the round-robin ring
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def active(self, tenant: str) -> int:
        return self._active.get(tenant, 0)

    def waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))

    @property
    def tenants_known(self) -> int:
        """Tenants with any state here (holding or waiting): the memory this scheduler uses."""
        return len(self._active.keys() | self._waiting.keys())

    @asynccontextmanager
    async def slot(self, tenant: str, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold one of `tenant`'s slots for the block; `SlotTimeout` if none is free within `timeout`."""
        await self.acquire(tenant, timeout)
        try:
            yield
        finally:
            self.release(tenant)

    async def acquire(self, tenant: str, timeout: float | None = None) -> None:
        if self._may_start(tenant):
            self._grant(tenant)
            return
        if timeout is not None and timeout <= 0:
            raise SlotTimeout("no free LLM call slot before the deadline")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # granted while the waiting task was being cancelled: give it back
            else:
                waiter.cancel()
                self._forget(tenant, waiter)
            if isinstance(exc, TimeoutError):
                raise SlotTimeout("no free LLM call slot before the deadline") from None
            raise

    def release(self, tenant: str) -> None:
        held = self._active.get(tenant, 0)
        if held <= 0:
            raise RuntimeError(f"tenant {tenant!r} holds no slot")
        if held == 1:
            del self._active[tenant]
        else:
            self._active[tenant] = held - 1
        self.in_use -= 1
        self._dispatch()

    def _may_start(self, tenant: str) -> bool:
        # Waiters exist only when no slot is free or their tenant is at its cap (`_dispatch` runs after
        # every release), so a caller that finds a free slot under its cap jumps no eligible waiter.
        return self.in_use < self.capacity and self._active.get(tenant, 0) < self.cap

    def _grant(self, tenant: str) -> None:
        self._active[tenant] = self._active.get(tenant, 0) + 1
        self.in_use += 1

    def _dispatch(self) -> None:
        """Hand free slots to waiting tenants under their cap, one per tenant per turn of the ring."""
        while self.in_use < self.capacity:
            tenant = next((t for t in self._waiting if self._active.get(t, 0) < self.cap), None)
            if tenant is None:
                return
            queue = self._waiting[tenant]
            waiter = queue.popleft()
            if queue:
                self._waiting.move_to_end(tenant)  # round-robin: this tenant's next waiter goes last
            else:
                del self._waiting[tenant]
            if waiter.done():  # cancelled, its task not yet resumed to forget it
                continue
            self._grant(tenant)
            waiter.set_result(None)

    def _forget(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        with suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[tenant]
