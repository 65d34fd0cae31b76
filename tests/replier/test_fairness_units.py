"""Units of fair LLM capacity: the fair scheduler, the breakers, the per-message deadline and the metrics.

No timing assertions: the order slots are handed out in, the breaker's states under a fake clock,
and how many calls reach the local OpenAI-compatible test double (tests/replier/fake_openai.py).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from isolation.egress import EgressSettings
from replier.core.config import ReplierSettings
from replier.llm import LlmError, LlmRequest, ProviderConfig
from replier.llm.base import ChatMessage
from replier.llm.breaker import BreakerKey, BreakerOpen, Breakers
from replier.llm.fairness import FairScheduler, SlotTimeout, tenant_cap
from replier.llm.guarded import LlmGuard, deadline_seconds
from replier.llm.offline import OfflineProvider
from replier.llm.openai import OpenAIProvider
from replier.llm.registry import ProviderRegistry
from replier.metrics import Metrics

LOOPBACK = EgressSettings(llm_allowed_hosts="127.0.0.1")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --- the fair scheduler -------------------------------------------------------------------------


def test_tenant_cap_defaults_to_half_the_slots_and_stays_in_range():
    assert tenant_cap(16, 0) == 8
    assert tenant_cap(1, 0) == 1
    assert tenant_cap(16, 4) == 4
    assert tenant_cap(16, 99) == 16
    with pytest.raises(ValueError):
        FairScheduler(0, 1)


def test_a_tenant_at_its_cap_waits_while_another_tenant_gets_a_slot_at_once():
    async def scenario():
        scheduler = FairScheduler(capacity=4, cap=2)
        await scheduler.acquire("a")
        await scheduler.acquire("a")
        third = asyncio.create_task(scheduler.acquire("a"))
        await _settle()
        assert not third.done() and scheduler.waiting("a") == 1  # at its cap, though slots are free
        await scheduler.acquire("b")  # another tenant is not held up by a's queue
        assert scheduler.active("b") == 1 and scheduler.in_use == 3
        scheduler.release("a")
        await third
        assert scheduler.active("a") == 2
        for tenant in ("a", "a", "b"):
            scheduler.release(tenant)
        assert scheduler.in_use == 0 and scheduler.tenants_known == 0  # idle tenants leave nothing behind
        with pytest.raises(RuntimeError):
            scheduler.release("a")

    asyncio.run(scenario())


def test_freed_slots_go_round_robin_between_waiting_tenants():
    async def scenario():
        scheduler = FairScheduler(capacity=1, cap=1)
        await scheduler.acquire("holder")
        order: list[str] = []

        async def wait(tenant: str) -> None:
            await scheduler.acquire(tenant)
            order.append(tenant)

        tasks = [asyncio.create_task(wait("a")) for _ in range(3)]
        await _settle()
        tasks += [asyncio.create_task(wait("b")), asyncio.create_task(wait("c"))]
        await _settle()
        assert scheduler.waiting("a") == 3
        scheduler.release("holder")
        for _ in range(5):
            await _settle()
            scheduler.release(order[-1])
        await asyncio.gather(*tasks)
        return order

    # Arrival order would be a, a, a, b, c: the fair queue alternates between tenants.
    assert asyncio.run(scenario()) == ["a", "b", "c", "a", "a"]


def test_the_wait_for_a_slot_ends_at_the_deadline_and_is_forgotten():
    async def scenario():
        scheduler = FairScheduler(capacity=1, cap=1)
        await scheduler.acquire("a")
        with pytest.raises(SlotTimeout):
            await scheduler.acquire("b", timeout=0)
        with pytest.raises(SlotTimeout):
            await scheduler.acquire("b", timeout=0.01)
        assert scheduler.waiting("b") == 0 and scheduler.tenants_known == 1
        assert isinstance(SlotTimeout("x"), LlmError)

    asyncio.run(scenario())


def test_a_cancelled_waiter_is_forgotten_and_a_slot_granted_to_it_is_given_back():
    async def scenario():
        scheduler = FairScheduler(capacity=1, cap=1)
        await scheduler.acquire("a")
        waiting = asyncio.create_task(scheduler.acquire("b"))
        await _settle()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert scheduler.waiting("b") == 0
        # Granted and cancelled before it ran: the slot must come back.
        granted = asyncio.create_task(scheduler.acquire("c"))
        await _settle()
        scheduler.release("a")  # hands the slot to c's waiter
        granted.cancel()
        await asyncio.gather(granted, return_exceptions=True)
        assert scheduler.in_use == 0 and scheduler.tenants_known == 0
        # A waiter cancelled but not yet resumed when a slot frees is skipped, not granted.
        await scheduler.acquire("a")
        first = asyncio.create_task(scheduler.acquire("d"))
        second = asyncio.create_task(scheduler.acquire("e"))
        await _settle()
        first.cancel()
        scheduler.release("a")
        await second
        await asyncio.gather(first, return_exceptions=True)
        assert scheduler.active("e") == 1 and scheduler.active("d") == 0
        scheduler.release("e")
        async with scheduler.slot("f", timeout=None):
            assert scheduler.active("f") == 1
        assert scheduler.in_use == 0 and scheduler.tenants_known == 0

    asyncio.run(scenario())


# --- breakers -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = BreakerKey.of("t1", "a1", "http://llm/v1", "sk-secret", "m")


def test_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count():
    breakers = Breakers(failures=3, cooldown=10, clock=Clock())
    for _ in range(2):
        assert breakers.admit(KEY) is False
        breakers.failure(KEY, False)
    breakers.success(KEY, False)
    assert len(breakers) == 0  # a closed breaker with no failure is not stored
    for _ in range(3):
        breakers.admit(KEY)
        breakers.failure(KEY, False)
    assert breakers.state(KEY) == "open" and breakers.opened_total == 1
    with pytest.raises(BreakerOpen, match="breaker_open"):
        breakers.admit(KEY)
    assert breakers.rejected_total == 1
    assert "sk-secret" not in repr(KEY)  # the key itself is never kept, only a hash


def test_breaker_half_opens_after_the_cooldown_with_one_probe_and_closes_on_success():
    clock = Clock()
    breakers = Breakers(failures=1, cooldown=10, clock=clock)
    breakers.failure(KEY, False)
    clock.now += 9.9
    with pytest.raises(BreakerOpen):
        breakers.admit(KEY)
    clock.now += 0.2
    assert breakers.admit(KEY) is True and breakers.state(KEY) == "half_open"
    with pytest.raises(BreakerOpen):
        breakers.admit(KEY)  # one probe at a time
    breakers.check(KEY, True)  # the probe itself passes the gate
    with pytest.raises(BreakerOpen):
        breakers.check(KEY, False)
    breakers.failure(KEY, True)  # the probe failed: open for another cool-down
    assert breakers.state(KEY) == "open"
    with pytest.raises(BreakerOpen):
        breakers.admit(KEY)
    clock.now += 10
    assert breakers.admit(KEY) is True
    breakers.abandon(KEY, True)  # the probe never reached the model: the next message probes
    assert breakers.admit(KEY) is True
    breakers.success(KEY, True)
    assert breakers.state(KEY) == "closed" and breakers.closed_total == 1 and len(breakers) == 0
    breakers.check(KEY, False)
    breakers.abandon(KEY, False)


def test_breaker_memory_is_bounded_and_open_and_close_are_logged_throttled(caplog):
    breakers = Breakers(failures=1, cooldown=0.0, max_entries=3, clock=Clock())
    keys = [BreakerKey.of("t", f"a{i}", "u", None, "m") for i in range(5)]
    for key in keys:
        breakers.failure(key, False)
    assert len(breakers) == 3 and breakers.state(keys[0]) == "closed"  # the oldest were forgotten
    assert breakers.open_by_tenant() == {"t": 3}
    with caplog.at_level(logging.WARNING, "replier.llm.breaker"):
        for _ in range(3):  # opens and closes three times within the log interval
            breakers.failure(KEY, False)
            breakers.success(KEY, False)
    lines = [r.getMessage() for r in caplog.records if "tenant t1 " in r.getMessage()]
    assert len([line for line in lines if "breaker OPEN" in line]) == 1
    assert len([line for line in lines if "breaker closed" in line]) == 1
    with pytest.raises(ValueError):
        Breakers(failures=0)


def test_breaker_metrics_have_no_tenant_label_but_a_top_n():
    metrics = Metrics()
    breakers = Breakers(failures=1, cooldown=60, clock=Clock())
    metrics.watch_breakers(breakers, top=2)
    for tenant, agents in (("t-big", 3), ("t-mid", 2), ("t-small", 1)):
        for i in range(agents):
            breakers.failure(BreakerKey.of(tenant, f"a{i}", "u", None, "m"), False)
    text = metrics.render()[0].decode()
    assert "replier_llm_breakers_open 6.0" in text
    assert "replier_llm_breaker_tenants 3.0" in text
    assert 'replier_llm_breakers_open_tenant{tenant="t-big"} 3.0' in text
    assert 'replier_llm_breakers_open_tenant{tenant="t-mid"} 2.0' in text
    assert "t-small" not in text  # only the top 2 tenants are labelled
    assert 'replier_llm_breaker_transitions_total{to="open"} 6.0' in text


# --- one message's calls: deadline, breaker, fair slots (against the fake OpenAI server) -------------


def _provider(fake_llm, **kwargs) -> OpenAIProvider:
    kwargs.setdefault("max_retries", 5)
    kwargs.setdefault("backoff", 0.0)
    return OpenAIProvider(fake_llm.base_url, model="fake-echo", trusted=True, egress=LOOPBACK, **kwargs)


def _config(fake_llm, model: str, timeout: float) -> ProviderConfig:
    return ProviderConfig("openai", model, base_url=fake_llm.base_url, timeout=timeout, trusted=True)


def _request(model: str, timeout: float, text: str = "hi") -> LlmRequest:
    return LlmRequest([ChatMessage("user", text)], model=model, timeout=timeout, user_text=text)


def test_a_hanging_model_is_not_retried_past_the_deadline(fake_llm):
    async def scenario():
        provider = _provider(fake_llm)  # five retries allowed
        guard = LlmGuard(Breakers(failures=5), deadline=0.5)  # after one 0.3 s timeout, no full attempt fits
        before = fake_llm.calls("fake-hang")
        call = guard.call(provider, _config(fake_llm, "fake-hang", 0.3), "t", "a")
        with pytest.raises(LlmError, match="timeout"):
            await call.complete(_request("fake-hang", 0.3))
        await provider.aclose()
        return fake_llm.calls("fake-hang") - before

    assert asyncio.run(scenario()) == 1  # the old code made six calls (one per attempt)


def test_a_timeout_is_retried_while_a_full_attempt_fits_before_an_explicit_deadline(fake_llm):
    async def scenario():
        provider = _provider(fake_llm)  # five retries allowed
        guard = LlmGuard(Breakers(failures=5), deadline=2.0)  # room for several 0.3 s attempts, not six
        before = fake_llm.calls("fake-hang")
        with pytest.raises(LlmError, match="timeout"):
            await guard.call(provider, _config(fake_llm, "fake-hang", 0.3), "t", "a").complete(
                _request("fake-hang", 0.3)
            )
        await provider.aclose()
        return fake_llm.calls("fake-hang") - before

    assert 2 <= asyncio.run(scenario()) <= 6


def test_fast_errors_are_retried_within_the_deadline_and_not_after_it(fake_llm):
    async def scenario():
        provider = _provider(fake_llm, max_retries=2)
        guard = LlmGuard(Breakers(failures=5))
        before = fake_llm.calls("fake-fail-retry")
        with pytest.raises(LlmError, match="HTTP 500"):
            await guard.call(provider, _config(fake_llm, "fake-fail-retry", 5), "t", "a").complete(
                _request("fake-fail-retry", 5)
            )
        retried = fake_llm.calls("fake-fail-retry") - before
        expired = LlmGuard(Breakers(failures=5), deadline=1e-9).call(
            provider, _config(fake_llm, "fake-fail-retry", 5), "t", "a"
        )
        await asyncio.sleep(0.001)
        with pytest.raises(LlmError, match="deadline passed"):
            await expired.complete(_request("fake-fail-retry", 5))
        slow_backoff = _provider(fake_llm, max_retries=2, backoff=60)
        call = LlmGuard(Breakers(failures=5), deadline=5).call(
            slow_backoff, _config(fake_llm, "fake-fail-retry", 5), "t", "b"
        )
        before_backoff = fake_llm.calls("fake-fail-retry")
        with pytest.raises(LlmError, match="HTTP 500"):
            await call.complete(_request("fake-fail-retry", 5))  # the backoff would pass the deadline
        after_backoff = fake_llm.calls("fake-fail-retry") - before_backoff
        for p in (provider, slow_backoff):
            await p.aclose()
        return retried, fake_llm.calls("fake-fail-retry") - before - retried - after_backoff, after_backoff

    assert asyncio.run(scenario()) == (3, 0, 1)


def test_the_slot_wait_counts_against_the_deadline_and_other_tenants_pass(fake_llm):
    async def scenario():
        provider = _provider(fake_llm, concurrency=2, tenant_concurrency=1)
        guard = LlmGuard(Breakers(failures=5))
        first = fake_llm.calls("fake-hang")
        hung = asyncio.create_task(
            guard.call(provider, _config(fake_llm, "fake-hang", 5), "a", "a1").complete(_request("fake-hang", 5))
        )
        await _settle_until(lambda: fake_llm.calls("fake-hang") > first)  # the hung call reached the model
        before = fake_llm.calls("fake-hang")
        waiting = guard.call(provider, _config(fake_llm, "fake-hang", 0.2), "a", "a2")
        with pytest.raises(SlotTimeout):
            await waiting.complete(_request("fake-hang", 0.2))  # a's only slot is held by the hung call
        other = await guard.call(provider, _config(fake_llm, "fake-echo", 5), "b", "b1").complete(
            _request("fake-echo", 5, "from b")
        )
        calls = fake_llm.calls("fake-hang") - before
        hung.cancel()
        await asyncio.gather(hung, return_exceptions=True)
        state = guard.breakers.state(BreakerKey.of("a", "a2", fake_llm.base_url, None, "fake-hang"))
        await provider.aclose()
        return calls, other.text, state, provider.scheduler.in_use

    calls, text, state, in_use = asyncio.run(scenario())
    assert calls == 0 and text == "LLM reply to: from b"
    assert state == "closed"  # a call that never reached the model does not count against the breaker
    assert in_use == 0


async def _settle_until(predicate) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def test_an_open_breaker_answers_without_calling_and_stops_queued_calls(fake_llm):
    async def scenario():
        provider = _provider(fake_llm, max_retries=0, concurrency=2, tenant_concurrency=1)
        guard = LlmGuard(Breakers(failures=2, cooldown=300))
        config = _config(fake_llm, "fake-fail-breaker", 5)
        before = fake_llm.calls("fake-fail-breaker")
        for _ in range(2):
            with pytest.raises(LlmError, match="HTTP 500"):
                await guard.call(provider, config, "t", "a").complete(_request("fake-fail-breaker", 5))
        with pytest.raises(BreakerOpen):
            await guard.call(provider, config, "t", "a").complete(_request("fake-fail-breaker", 5))
        calls = fake_llm.calls("fake-fail-breaker") - before
        # Memory extraction is skipped while the breaker is open.
        call = guard.call(provider, config, "t", "a")
        memory = await call.extract_memory(_request("fake-fail-breaker", 5, "my name is Zed"), "reply")
        # A call admitted while closed, queued behind a slot, is stopped by the gate once it opens.
        other = BreakerKey.of("t", "b", fake_llm.base_url, None, "fake-hang")
        hang_first = fake_llm.calls("fake-hang")
        hold = asyncio.create_task(
            guard.call(provider, _config(fake_llm, "fake-hang", 5), "t", "b").complete(_request("fake-hang", 5))
        )
        await _settle_until(lambda: provider.scheduler.active("t") == 1 and fake_llm.calls("fake-hang") > hang_first)
        queued = asyncio.create_task(
            guard.call(provider, _config(fake_llm, "fake-hang", 5), "t", "b").complete(_request("fake-hang", 5))
        )
        await _settle_until(lambda: provider.scheduler.waiting("t") == 1)
        hang_before = fake_llm.calls("fake-hang")
        guard.breakers.failure(other, False)
        guard.breakers.failure(other, False)  # opens b's breaker while `queued` waits
        hold.cancel()
        await asyncio.gather(hold, return_exceptions=True)
        with pytest.raises(BreakerOpen):
            await queued
        stopped = fake_llm.calls("fake-hang") - hang_before
        await provider.aclose()
        return calls, memory, stopped

    assert asyncio.run(scenario()) == (2, None, 0)


def test_extraction_is_bounded_by_the_message_deadline_and_the_offline_provider_passes_through(fake_llm):
    async def scenario():
        provider = _provider(fake_llm)
        guard = LlmGuard(Breakers(failures=5))
        call = guard.call(provider, _config(fake_llm, "fake-echo", 5), "t", "a")
        request = _request("fake-echo", 5, "my name is Zed")
        reply = await call.complete(request)
        memory = await call.extract_memory(request, reply.text)
        assert request.tenant == "t" and request.deadline == call.deadline
        late = guard.call(provider, _config(fake_llm, "fake-echo", 5), "t", "a")
        late.deadline = 0.0  # the message's time is used up: no extraction call
        before = fake_llm.calls("fake-echo")
        skipped = await late.extract_memory(request, reply.text)
        extra = fake_llm.calls("fake-echo") - before
        offline = guard.call(OfflineProvider(), ProviderConfig("offline", "offline"), "t", "a")
        offline_reply = await offline.complete(_request("offline", 5, "my name is Ann"))
        offline_memory = await offline.extract_memory(_request("offline", 5, "my name is Ann"), "")
        await provider.aclose()
        return memory, skipped, extra, offline_reply.offline, offline_memory

    assert asyncio.run(scenario()) == ("The user's name is Zed", None, 0, True, "the user's name is Ann")


def test_settings_and_registry_wire_the_tenant_cap_and_the_deadline():
    settings = ReplierSettings(_env_file=None)
    assert settings.llm_tenant_concurrency == 0 and settings.llm_deadline_seconds == 0
    assert settings.llm_breaker_failures == 5 and settings.llm_breaker_cooldown_seconds == 30
    assert deadline_seconds(30, 0) == 37.5 and deadline_seconds(2, 0) == 3 and deadline_seconds(30, 12) == 12
    registry = ProviderRegistry(concurrency=16, tenant_concurrency=3, egress=LOOPBACK)
    provider = registry.get(ProviderConfig("openai", "m", base_url="http://127.0.0.1:9/v1", trusted=True))
    assert provider.scheduler.capacity == 16 and provider.scheduler.cap == 3
    default = ProviderRegistry(concurrency=16, egress=LOOPBACK).get(
        ProviderConfig("openai", "m", base_url="http://127.0.0.1:9/v1", trusted=True)
    )
    assert default.scheduler.cap == 8
    asyncio.run(registry.aclose())
