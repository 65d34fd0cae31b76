"""Connections per tenant counted in Redis (replier/connection_counts.py): two `TenantLimiter`s of one
deployment (two repliers' worth, on the leg's database and the machine's Redis, a prefix of this
test's own) enforce one `connections` limit; a replier that died stops counting once its alive key
expires; when Redis fails, each counts its own connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis
import socketio
from replier_support import make_tenant

from isolation import IsolationContext, Scoped
from replier import connection_counts
from replier.connections import ConnectionRegistry
from replier.core.config import ReplierSettings
from replier.limits import TenantLimiter
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.store import Store
from testsupport.redis_server import PrivateRedis, require_redis, unique_prefix


@pytest.fixture
def prefix() -> Iterator[str]:
    url = require_redis()
    value = unique_prefix()
    yield value
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{value}:*"))
    if keys:
        client.delete(*keys)
    client.close()


async def _limiters(count: int, store: Store, **settings) -> list[TenantLimiter]:
    metrics = Metrics()
    return [
        TenantLimiter(
            ReplierSettings(**settings),
            store,
            metrics,
            ConnectionRegistry(),
            Outbox(socketio.AsyncServer(async_mode="asgi"), metrics),
        )
        for _ in range(count)
    ]


def _with_store(scenario):
    async def wrapped():
        store = Store(workers=1, batch_max=16, checkpoint_seconds=0)
        store.start()
        try:
            return await scenario(store)
        finally:
            await asyncio.to_thread(store.stop)

    return asyncio.run(wrapped())


async def _connect(limiter: TenantLimiter, tenant_id: str) -> str | None:
    """What the gate does: the refusal code, or None and the connection counted."""
    await limiter.load(tenant_id)
    refused = await limiter.connection_refusal(tenant_id)
    if refused is None:
        limiter.connected(tenant_id)
        return None
    return refused[0]


def test_two_repliers_share_one_connection_limit(configured_db, prefix):
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"connections": 3})
    url = require_redis()

    async def scenario(store: Store):
        first, second, third = await _limiters(3, store, redis_url=url, redis_prefix=prefix)
        try:
            steps = [
                await _connect(first, ta.tenant_id),
                await _connect(second, ta.tenant_id),
                await _connect(first, ta.tenant_id),
                await _connect(second, ta.tenant_id),  # 3 open in total: refused
                await _connect(first, ta.tenant_id),
            ]
            await first.disconnected(ta.tenant_id)
            steps.append(await _connect(second, ta.tenant_id))  # a place came free on the other replier
            steps.append(await _connect(second, ta.tenant_id))
            # A third replier dies without a goodbye (its two connections are gone with it): once
            # its alive key is gone, the others stop counting them.
            await first.disconnected(ta.tenant_id)
            await second.disconnected(ta.tenant_id)
            assert await _connect(third, ta.tenant_id) is None
            assert await _connect(third, ta.tenant_id) is None
            assert await _connect(first, ta.tenant_id) == "tenant_connections"
            raw = redis.Redis.from_url(url)
            raw.delete(f"{prefix}:replier-alive:{third.process_id}")  # as if it expired
            raw.close()
            steps.append(await _connect(first, ta.tenant_id))
            return steps
        finally:
            for limiter in (first, second, third):
                await limiter.aclose()

    steps = _with_store(scenario)
    assert steps == [None, None, None, "tenant_connections", "tenant_connections", None, "tenant_connections", None]


def test_a_stopped_replier_leaves_no_count_behind(configured_db, prefix):
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"connections": 1})
    url = require_redis()

    async def scenario(store: Store):
        first, second = await _limiters(2, store, redis_url=url, redis_prefix=prefix)
        try:
            assert await _connect(first, ta.tenant_id) is None
            assert await _connect(second, ta.tenant_id) == "tenant_connections"
            await first.aclose()  # a graceful stop: its place is free at once
            return await _connect(second, ta.tenant_id)
        finally:
            await second.aclose()

    assert _with_store(scenario) is None


def test_redis_down_counts_per_replier_and_recounts_when_it_is_back(configured_db, caplog, monkeypatch):
    monkeypatch.setattr(connection_counts, "ALIVE_TTL_SECONDS", 30.0)
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"connections": 2})
    private = PrivateRedis().start()

    async def scenario(store: Store):
        first, second = await _limiters(2, store, redis_url=private.url, redis_prefix=unique_prefix())
        try:
            assert await _connect(first, ta.tenant_id) is None
            private.stop()
            # Down: each replier checks its own count (availability first).
            assert await _connect(second, ta.tenant_id) is None
            assert await _connect(second, ta.tenant_id) is None
            assert await _connect(second, ta.tenant_id) == "tenant_connections"
            assert await _connect(first, ta.tenant_id) is None
            private.start()  # empty: a restarted in-memory server
            # Both write their counts again (first 2, second 2): the tenant is over its limit of 2.
            await first.heartbeat()
            await second.heartbeat()
            refused = await _connect(first, ta.tenant_id)
            await second.disconnected(ta.tenant_id)
            await second.disconnected(ta.tenant_id)
            await first.disconnected(ta.tenant_id)
            return refused, await _connect(second, ta.tenant_id)
        finally:
            for limiter in (first, second):
                await limiter.aclose()

    try:
        with caplog.at_level(logging.INFO, logger="replier"):
            refused, after = _with_store(scenario)
    finally:
        private.stop()
    assert refused == "tenant_connections" and after is None
    warnings = [r.getMessage() for r in caplog.records if "connection limits: Redis failed" in r.getMessage()]
    assert len(warnings) == 2  # one per replier and outage, not one per connect
    assert "counting connections there" in caplog.text


def test_redis_lost_under_open_connections_is_logged_once_and_nothing_raised(configured_db, caplog):
    ta = make_tenant()
    private = PrivateRedis().start()

    async def scenario(store: Store):
        (limiter,) = await _limiters(1, store, redis_url=private.url, redis_prefix=unique_prefix())
        assert await _connect(limiter, ta.tenant_id) is None  # counted in Redis
        private.stop()
        await limiter.disconnected(ta.tenant_id)  # the release fails: logged, written again later
        assert await _connect(limiter, ta.tenant_id) is None  # the local count decides
        await limiter.disconnected(ta.tenant_id)  # during the outage nothing is sent
        await limiter.aclose()  # the goodbye fails quietly (the alive key expires by itself)
        return dict(limiter.open)

    try:
        with caplog.at_level(logging.WARNING, logger="replier"):
            assert _with_store(scenario) == {}
    finally:
        private.stop()
    assert caplog.text.count("connection limits: Redis failed") == 1


def test_a_replier_that_never_reached_redis_checks_its_own_count(configured_db):
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"connections": 1})
    dead = PrivateRedis()  # nothing listens on its port

    async def scenario(store: Store):
        (limiter,) = await _limiters(1, store, redis_url=dead.url, redis_prefix=unique_prefix())
        try:
            return [await _connect(limiter, ta.tenant_id), await _connect(limiter, ta.tenant_id)]
        finally:
            await limiter.aclose()

    assert _with_store(scenario) == [None, "tenant_connections"]
