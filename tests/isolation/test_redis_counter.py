"""The fixed-window counter in Redis (isolation/redis_counter.py), against the machine's Redis with a
key prefix of each test's own (deleted afterwards), and a private redis-server for the outage.

Two counters on one prefix stand for two processes of a deployment: they must enforce one limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from isolation import redis_counter
from isolation.limits import FixedWindowCounter
from isolation.redis_counter import AsyncRedisWindowCounter, RedisWindowCounter
from testsupport.redis_server import PrivateRedis, require_redis, unique_prefix


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_redis()


@pytest.fixture
def prefix(redis_url) -> Iterator[str]:
    """A prefix of this test's own; its keys are deleted afterwards."""
    value = unique_prefix()
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def client(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    yield client
    client.close()


def _fresh_window(window: float, room: float) -> None:
    """Wait for a window start when less than `room` seconds are left of the current one."""
    now = time.time()
    left = math.floor(now / window) * window + window - now
    if left < room:
        time.sleep(left + 0.02)


def test_two_processes_share_one_limit_and_refusals_count_nothing(client, prefix):
    first, second = RedisWindowCounter(client, prefix), RedisWindowCounter(client, prefix)
    _fresh_window(60, 5)
    answers = [(first if i % 2 else second).take([(("tenant", "t1"), 3)], 60) for i in range(5)]
    assert answers[:3] == [None, None, None]
    refused = answers[3]
    assert refused is not None and refused.index == 0 and 0 < refused.retry_after <= 60
    assert 1 <= refused.retry_after_seconds <= 60
    assert first.count(("tenant", "t1"), 60) == 3  # the refused takes were not counted
    assert second.count(("tenant", "t2"), 60) == 0  # another key is another count
    # 0 = unlimited, and it still counts
    assert first.take([(("tenant", "t3"), 0)], 60, amount=7) is None
    assert second.count(("tenant", "t3"), 60) == 7


def test_checks_are_all_or_nothing_and_name_the_one_that_refused(client, prefix):
    counter = RedisWindowCounter(client, prefix)
    _fresh_window(60, 5)
    agent, tenant = ("agent", "t1", "a1"), ("tenant", "t1")
    assert counter.take([(agent, 2), (tenant, 3)], 60) is None
    assert counter.take([(("agent", "t1", "a2"), 5), (tenant, 3)], 60) is None
    assert counter.take([(agent, 2), (tenant, 3)], 60) is None  # agent 2/2, tenant 3/3
    refusal = counter.take([(("agent", "t1", "a2"), 5), (tenant, 3)], 60)
    assert refusal is not None and refusal.index == 1  # the tenant's limit
    refusal = counter.take([(agent, 2), (tenant, 10)], 60)
    assert refusal is not None and refusal.index == 0  # the agent's
    assert counter.count(("agent", "t1", "a2"), 60) == 1  # a refused take counted under no key
    assert counter.count(tenant, 60) == 3


def test_counts_reset_at_the_window_and_their_keys_expire(client, prefix):
    counter = RedisWindowCounter(client, prefix)
    window = 0.5
    _fresh_window(window, 0.3)
    assert counter.take([("k", 1)], window) is None
    refusal = counter.take([("k", 1)], window)
    assert refusal is not None and refusal.retry_after <= window
    keys = list(client.scan_iter(match=f"{prefix}:window:k:*"))
    assert len(keys) == 1 and 0 < client.pttl(keys[0]) <= window * 1000 + 1000  # gone after its window
    time.sleep(refusal.retry_after + 0.02)
    assert counter.take([("k", 1)], window) is None  # a new window


def test_add_and_count(client, prefix):
    counter = RedisWindowCounter(client, prefix)
    assert counter.add(("tokens", "t1"), 86400, 40) == 40
    assert counter.add(("tokens", "t1"), 86400, 2) == 42
    assert RedisWindowCounter(client, prefix).count(("tokens", "t1"), 86400) == 42


def test_parallel_takes_from_threads_pass_exactly_the_limit(redis_url, prefix):
    counters = [RedisWindowCounter(redis.Redis.from_url(redis_url), prefix) for _ in range(2)]
    _fresh_window(60, 5)
    results: list[bool] = []
    start = threading.Barrier(20)

    def one(i: int) -> None:
        start.wait()
        results.append(counters[i % 2].take([(("tenant", "burst"), 7)], 60) is None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 13 + [True] * 7


def test_the_async_counter_is_the_same_count(redis_url, prefix, client):
    """The replier's counter (redis.asyncio) and the configurator's count the same keys."""

    async def scenario() -> tuple[list[bool], int]:
        counters = [AsyncRedisWindowCounter(aioredis.Redis.from_url(redis_url), prefix) for _ in range(2)]
        try:
            answers = await asyncio.gather(*(counters[i % 2].take([(("tenant", "async"), 5)], 60) for i in range(12)))
            assert await counters[0].add(("tenant", "other"), 60, 3) == 3
            return [a is None for a in answers], await counters[1].count(("tenant", "async"), 60)
        finally:
            for counter in counters:
                await counter.aclose()

    _fresh_window(60, 5)
    passed, counted = asyncio.run(scenario())
    assert sorted(passed) == [False] * 7 + [True] * 5
    assert counted == 5
    assert RedisWindowCounter(client, prefix).count(("tenant", "async"), 60) == 5


def test_an_outage_falls_back_to_the_process_with_one_warning_and_recovers(monkeypatch, caplog, prefix):
    monkeypatch.setattr(redis_counter, "RETRY_SECONDS", 0.2)
    private = PrivateRedis().start()
    url = private.url.replace("redis://", "redis://:pw-in-url@")  # a password must never be logged
    private.stop()
    fallback = FixedWindowCounter()
    counter = RedisWindowCounter(
        redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5), prefix, fallback
    )
    _fresh_window(60, 5)
    try:
        with caplog.at_level(logging.INFO, logger="maitenant.limits"):
            # Down: counted in this process, the limit still holds (not fail-open, not fail-closed).
            assert [counter.take([("k", 2)], 60) is None for _ in range(3)] == [True, True, False]
            assert counter.count("k", 60) == 2 == fallback.count("k", 60)
            time.sleep(0.25)
            assert counter.take([("k", 2)], 60) is not None  # tried Redis again, still down
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "counting in this process" in warnings[0].getMessage()
            private.start()  # back (empty: an in-memory server)
            time.sleep(0.25)
            assert counter.take([("k", 2)], 60) is None  # counted in Redis again
            assert "Redis answers again" in caplog.text
            assert fallback.count("k", 60) == 2  # the fallback was not used
            assert "pw-in-url" not in caplog.text
    finally:
        private.stop()


def test_a_down_redis_is_not_asked_on_every_call(monkeypatch, prefix):
    """During an outage the counter waits RETRY_SECONDS between tries: a blackholed server would
    otherwise add its timeout to every message."""
    monkeypatch.setattr(redis_counter, "RETRY_SECONDS", 60.0)
    private = PrivateRedis()  # nothing listens on its port
    calls = []

    class Counting(redis.Redis):
        def evalsha(self, *args, **kwargs):
            calls.append(args)
            return super().evalsha(*args, **kwargs)

    counter = RedisWindowCounter(Counting.from_url(private.url, socket_connect_timeout=0.5), prefix)
    for _ in range(20):
        counter.take([("k", 100)], 60)
    assert len(calls) == 1
    assert counter.fallback.count("k", 60) == 20


def test_the_async_counter_falls_back_too(prefix):
    dead = PrivateRedis()  # nothing listens on its port

    async def scenario() -> tuple:
        counter = AsyncRedisWindowCounter(aioredis.Redis.from_url(dead.url, socket_connect_timeout=0.5), prefix)
        try:
            first = await counter.take([("k", 1)], 60)
            second = await counter.take([("k", 1)], 60)
            return first, second, await counter.add("k", 60, 4), await counter.count("k", 60)
        finally:
            await counter.aclose()

    _fresh_window(60, 5)
    first, second, added, counted = asyncio.run(scenario())
    assert first is None and second is not None and second.index == 0
    assert added == 5 and counted == 5
