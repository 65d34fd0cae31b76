"""REDIS_URL on the replier: python-socketio's Redis manager, and change signals that reach every
replier at once (isolation/signals.py, replier/signals.py).

Two real repliers on the leg's database and the machine's Redis (a channel prefix of this test's own).
The periodic revocation check and the limits refresh are set to 10 and 1 minutes, so only a signal can
close a connection in time. Message rates are counted in Redis: one limit for both repliers.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import redis
from replier_support import (
    MaimClient,
    ReplierProcess,
    api_message,
    make_tenant,
    run,
    socketio_connect,
    wait_for,
)

from isolation import IsolationContext, Scoped
from isolation.signals import RedisPublisher, Signal, signals_channel
from replier.limits import QUOTA_REPLY
from testsupport.redis_server import PrivateRedis, require_redis, unique_prefix

SLOW_CHECK = {
    "REVOCATION_CHECK_SECONDS": "600",
    "AGENT_CACHE_SECONDS": "600",
    "KEY_CACHE_SECONDS": "600",
    "LIMITS_REFRESH_SECONDS": "60",
}


def health(server: ReplierProcess) -> dict:
    return httpx.get(f"{server.http}/health", timeout=5).json()


def subscribed(server: ReplierProcess) -> bool:
    signals = health(server)["signals"]
    return bool(signals and signals["subscribed"])


@pytest.fixture(scope="module")
def redis_url() -> str:
    return require_redis()


@pytest.fixture(scope="module")
def pair(provisioned, configured_db, redis_url):
    """Two repliers of one deployment (one REDIS_PREFIX), each subscribed to its signals."""
    prefix = unique_prefix()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, **SLOW_CHECK}
    servers = [ReplierProcess(provisioned.url, provisioned.app_role, **env).start() for _ in range(2)]
    try:
        for server in servers:
            run(wait_for(lambda s=server: subscribed(s)))
        yield prefix, servers
    finally:
        for server in servers:
            server.stop()


def test_revoked_key_closes_its_connections_on_every_replier(pair, redis_url):
    prefix, servers = pair
    tenant = make_tenant()
    other = make_tenant()  # another tenant's connection is not touched by this tenant's signal
    publisher = RedisPublisher(redis_url, prefix)

    async def scenario():
        clients = [await MaimClient(s.url, tenant.secret).start() for s in servers]
        bystander = await MaimClient(servers[1].url, other.secret).start()
        try:
            # Replies still reach the right client through the Redis manager's inline send.
            for n, client in enumerate(clients):
                await client.send(api_message(f"hello {n}", user_id=f"user-{n}"))
                reply = await client.reply()
                assert reply.message_info.message_id
            tenant.revoke()
            publisher.publish(Signal("key", tenant.tenant_id, key_id=tenant.key_id))
            for server in servers:
                await wait_for(lambda s=server: health(s)["connections"] == (1 if s is servers[1] else 0))
            assert bystander.client.is_connected()
            # The cached lookup was dropped too: a reconnect with the revoked key is refused now,
            # not after the 10-minute key cache.
            reason = await MaimClient(servers[0].url, tenant.secret).refused()
            assert "revoked" in reason
        finally:
            for client in [*clients, bystander]:
                await client.stop()

    run(scenario())
    publisher.close()
    assert all(health(s)["signals"]["received"] >= 1 for s in servers)


def test_agent_change_is_seen_at_the_next_message(pair, redis_url):
    prefix, servers = pair
    tenant = make_tenant(persona={"name": "Before"})
    publisher = RedisPublisher(redis_url, prefix)

    async def name_in_reply(client: MaimClient) -> str:
        await client.send(api_message("who are you?"))
        reply = await client.reply()
        return reply.message_info.sender_info.user_info.user_nickname

    async def scenario():
        client = await MaimClient(servers[0].url, tenant.secret).start()
        try:
            before = await name_in_reply(client)
            Scoped(IsolationContext(tenant.tenant_id)).agents.update(tenant.agent_id, name="After the change")
            # Without a signal the agent stays cached (AGENT_CACHE_SECONDS=600): the old name.
            assert await name_in_reply(client) == before
            received = health(servers[0])["signals"]["received"]
            publisher.publish(Signal("agent", tenant.tenant_id, agent_id=tenant.agent_id))
            await wait_for(lambda: health(servers[0])["signals"]["received"] > received)
            assert await name_in_reply(client) == "After the change"
        finally:
            await client.stop()

    run(scenario())
    publisher.close()


def test_malformed_signals_are_dropped_and_the_replier_keeps_listening(pair, redis_url):
    prefix, servers = pair
    raw = redis.Redis.from_url(redis_url)
    dropped = health(servers[0])["signals"]["dropped"]
    bad = [
        b"not json",
        b'["key"]',
        b'{"kind": "launch", "tenant_id": "t"}',
        b'{"kind": "key", "tenant_id": "t"}',
        b'{"kind": "agent", "tenant_id": ""}',
        b'{"kind": "tenant", "tenant_id": "' + b"x" * 2000 + b'"}',
    ]
    for message in bad:
        raw.publish(signals_channel(prefix), message)
    run(wait_for(lambda: health(servers[0])["signals"]["dropped"] == dropped + len(bad)))
    # A well-formed signal for a tenant with nothing open is harmless.
    received = health(servers[0])["signals"]["received"]
    raw.publish(signals_channel(prefix), Signal("tenant", "t_" + uuid.uuid4().hex).encode())
    run(wait_for(lambda: health(servers[0])["signals"]["received"] == received + 1))
    raw.close()
    assert subscribed(servers[0])


def test_redis_outage_falls_back_and_resubscribes(provisioned, configured_db):
    """Redis goes away: the replier keeps serving; when it is back, signals work again, and
    connections revoked during the outage are closed at the resubscription's re-check."""
    private = PrivateRedis().start()
    prefix = unique_prefix()
    env = {"REDIS_URL": private.url, "REDIS_PREFIX": prefix, **SLOW_CHECK}
    server = ReplierProcess(provisioned.url, provisioned.app_role, **env).start()
    tenant = make_tenant()
    try:
        run(wait_for(lambda: subscribed(server)))

        async def scenario():
            client = await MaimClient(server.url, tenant.secret).start()
            try:
                private.stop()
                await wait_for(lambda: not subscribed(server))
                assert health(server)["status"] == "ok"
                await client.send(api_message("still answered without Redis"))
                assert await client.reply()
                tenant.revoke()  # the signal would be lost: nobody hears it now
                private.start()
                await wait_for(lambda: subscribed(server), timeout=15)
                await wait_for(lambda: health(server)["connections"] == 0)
            finally:
                await client.stop()

        run(scenario())
        assert "Redis unreachable" in server.logs()
        # The message above was counted in the process (its rate limits fall back, once logged).
        assert server.logs().count("tenant limits: Redis failed") == 1
        assert "subscribed to Redis again" in server.logs()
    finally:
        server.stop()
        private.stop()


def test_publisher_failure_is_logged_not_raised(caplog):
    """A configurator whose Redis is down still commits the change; the log names no URL."""
    dead = PrivateRedis()  # a free port with nothing listening
    publisher = RedisPublisher(f"redis://:hunter2secret@127.0.0.1:{dead.port}/0", "p", timeout=0.2)
    with caplog.at_level("WARNING", logger="maitenant.signals"):
        publisher.publish(Signal("key", "t_1", key_id="k_1"))
    publisher.close()
    text = caplog.text
    assert "could not publish a key change of tenant t_1" in text
    assert "hunter2secret" not in text and "127.0.0.1" not in text
    asyncio.run(asyncio.sleep(0))


def test_a_tenant_message_limit_is_one_limit_across_both_repliers(pair):
    _prefix, servers = pair
    tenant = make_tenant()
    Scoped(IsolationContext(tenant.tenant_id)).tenant.set_limits(
        {"messages_per_minute": 3, "agent_messages_per_minute": 0}
    )

    async def scenario() -> list[tuple[str, object]]:
        clients = [await MaimClient(s.url, tenant.secret).start() for s in servers]
        try:
            left = 60 - time.time() % 60
            if left < 10:  # the four messages must fall in one window (of 60 s, aligned to the epoch)
                await asyncio.sleep(left + 0.05)
            answers = []
            for i in range(4):
                client = clients[i % 2]
                await client.send(api_message(f"m{i}", message_id=f"shared-{i}", user_id=f"u{i % 2}"))
                answers.append(await client.reply_or_error())
            return answers
        finally:
            for client in clients:
                await client.stop()

    answers = run(scenario())
    assert [kind for kind, _ in answers] == ["reply", "reply", "reply", "error"]
    error = answers[3][1]
    assert error["code"] == "rate_limited" and error["limit"] == "messages_per_minute"
    assert error["message_id"] == "shared-3" and 1 <= error["retry_after"] <= 60
    stored = [m["message_id"] for m in tenant.history("qq", user_id="u1") if m["direction"] == "in"]
    assert stored == ["shared-1"]  # nothing of the refused one


def test_suspension_and_resumption_reach_both_repliers_at_once(pair, redis_url):
    prefix, servers = pair
    tenant, other = make_tenant(), make_tenant()
    manager = Scoped(IsolationContext(tenant.tenant_id)).tenant
    publisher = RedisPublisher(redis_url, prefix)

    async def scenario() -> tuple[float, str]:
        clients = [await MaimClient(s.url, tenant.secret).start() for s in servers]
        bystander = await MaimClient(servers[0].url, other.secret).start()
        try:
            manager.set_status("suspended")
            publisher.publish(Signal("tenant", tenant.tenant_id))
            started = time.monotonic()
            await wait_for(lambda: [health(s)["connections"] for s in servers] == [1, 0], interval=0.02)
            elapsed = time.monotonic() - started
            assert bystander.client.is_connected()
            refused = await MaimClient(servers[1].url, tenant.secret).refused()
            manager.set_status("active")
            received = health(servers[1])["signals"]["received"]
            publisher.publish(Signal("tenant", tenant.tenant_id))
            await wait_for(lambda: health(servers[1])["signals"]["received"] > received)
            # Without the signal the refused connect's reading would stand for LIMITS_REFRESH_SECONDS (60).
            assert await socketio_connect(servers[1].url, {"x-apikey": tenant.secret, "x-platform": "qq"}) is None
            return elapsed, refused
        finally:
            for client in [*clients, bystander]:
                await client.stop()

    elapsed, refused = run(scenario())
    publisher.close()
    assert elapsed < 1.0, f"closed {elapsed:.2f} s after the signal"
    assert "suspended by the operator" in refused


def test_a_token_budget_spent_on_one_replier_counts_on_the_other(provisioned, configured_db, redis_url, fake_llm):
    """Both clients are connected (each replier seeded the tenant's budget at 0) before one answer on
    replier 1 uses the whole budget; within TOKEN_BUDGET_SYNC_SECONDS replier 2 reads that spend from
    the database and answers with the quota reply, without calling the model."""
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": unique_prefix(), "LIMITS_REFRESH_SECONDS": "0.5"}
    env["TOKEN_BUDGET_SYNC_SECONDS"] = "1"
    llm = {"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-echo", "timeout_seconds": 5}
    tenant = make_tenant(llm=llm, llm_key="sk-budget-sync")
    Scoped(IsolationContext(tenant.tenant_id)).tenant.set_limits({"tokens_per_day": 18})  # one answer
    servers = [ReplierProcess(provisioned.url, provisioned.app_role, **env).start() for _ in range(2)]

    async def scenario():
        clients = [await MaimClient(s.url, tenant.secret).start() for s in servers]
        try:
            await clients[0].send(api_message("spend it", message_id="budget-0"))
            spent = await clients[0].reply()
            calls = len(fake_llm.requests)
            await asyncio.sleep(2.5)  # a sync interval and a refresh on replier 2
            await clients[1].send(api_message("and now?", message_id="budget-1", user_id="other"))
            refused = await clients[1].reply()
            return spent, refused, len(fake_llm.requests) - calls
        finally:
            for client in clients:
                await client.stop()

    try:
        spent, refused, more_calls = run(scenario())
    finally:
        for server in servers:
            server.stop()
    assert spent.message_segment.data.startswith("LLM reply to")
    assert refused.message_segment.data == QUOTA_REPLY and more_calls == 0
    assert refused.message_info.additional_config["maitenant"]["error"] == "quota_exceeded"
