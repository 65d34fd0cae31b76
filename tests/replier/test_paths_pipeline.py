"""The pipeline's edge paths, driven in-process: a real `Replier` with a real (unserved) Socket.IO
server, real metrics and a real `Store` on the leg's database. What a client would receive is read
from the metrics (every error a client gets is counted by code) and what is stored from the database."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import uuid

import pytest
import socketio
from replier_support import make_tenant, wait_for

from isolation import IsolationContext, Scoped
from isolation.cleanup import delete_agent_history
from isolation.egress import EgressSettings
from replier import gate, stream_cache
from replier.connections import Connection, new_connection_id
from replier.core.config import ReplierSettings
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.protocol import API, LEGACY, Inbound
from replier.service import Replier
from replier.store import Store


def _settings(**overrides) -> ReplierSettings:
    values = {
        "llm_provider": "",
        "llm_max_retries": 0,
        "agent_cache_seconds": 0,
        "gc_freeze": False,
        "revocation_check_seconds": 60,
        "usage_flush_seconds": 60,
    }
    values.update(overrides)
    return ReplierSettings(**values)


@contextlib.asynccontextmanager
async def _replier(**overrides):
    store = Store(workers=1, batch_max=64, checkpoint_seconds=0)
    store.start()
    metrics = Metrics()
    replier = Replier(_settings(**overrides), Outbox(socketio.AsyncServer(async_mode="asgi"), metrics), metrics, store)
    replier.providers.egress = EgressSettings(llm_allowed_hosts="127.0.0.1")  # the fake LLM listens there
    try:
        yield replier
    finally:
        await asyncio.to_thread(replier.recovery.close)  # the scan's thread and connection, if it ran
        await asyncio.to_thread(store.stop)
        await replier.providers.aclose()


def _metric(replier: Replier, name: str, **labels) -> float:
    return replier.metrics.registry.get_sample_value(name, labels) or 0.0


def _rejected(replier: Replier, code: str) -> float:
    return _metric(replier, "replier_messages_rejected_total", code=code)


def _conn(replier: Replier, ta, protocol: str = API, *, agent_id: str | None = None, tenant_id: str | None = None):
    conn = Connection(
        sid=uuid.uuid4().hex,
        connection_id=new_connection_id(),
        protocol=protocol,
        key_id=ta.key_id,
        tenant_id=tenant_id if tenant_id is not None else ta.tenant_id,
        agent_id=agent_id or ta.agent_id,
        platform="qq",
        api_key=ta.secret,
    )
    replier.connections.add(conn)
    return conn


def _inbound(message_id: str, text: str = "hello", user_id: str = "u1", protocol: str = API) -> Inbound:
    return Inbound(
        protocol,
        "env-" + message_id,
        message_id,
        "qq",
        1.0,
        text,
        {"type": "text", "data": text},
        user_id,
        "U",
        None,
        None,
    )


async def _settle(replier: Replier) -> None:
    await replier.streams.settle(15)


def _environ(secret: str) -> dict:
    return {"HTTP_X_APIKEY": secret, "HTTP_X_PLATFORM": "qq"}


# -- connecting -------------------------------------------------------------------------------------
def test_a_draining_server_refuses_new_connections(configured_db):
    ta = make_tenant()

    async def scenario():
        async with _replier() as replier:
            await replier.gate.on_connect("sid-before", _environ(ta.secret))
            assert len(replier.connections) == 1
            await replier.drain(1.0)
            with pytest.raises(socketio.exceptions.ConnectionRefusedError, match="shutting down"):
                await replier.gate.on_connect("sid-after", _environ(ta.secret))
            await replier.drain(1.0)  # draining twice is harmless
            return _metric(replier, "replier_connections_refused_total", reason="shutting_down"), len(
                replier.connections
            )

    refused, open_connections = asyncio.run(scenario())
    assert refused == 1 and open_connections == 1


def test_concurrent_connects_cannot_exceed_the_maximum(configured_db):
    """Both pass the first check before either key lookup returns; the second check refuses one."""
    ta = make_tenant()

    async def scenario():
        async with _replier(max_connections=1) as replier:
            results = await asyncio.gather(
                replier.gate.on_connect("sid-a", _environ(ta.secret)),
                replier.gate.on_connect("sid-b", _environ(ta.secret)),
                return_exceptions=True,
            )
            return replier, results

    replier, results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, socketio.exceptions.ConnectionRefusedError)]
    assert len(refused) == 1 and "server full" in str(refused[0])
    assert len(replier.connections) == 1
    assert _metric(replier, "replier_connections_refused_total", reason="server_full") == 1


def test_the_key_cache_is_bounded(configured_db, monkeypatch):
    ta = make_tenant()
    monkeypatch.setattr(gate, "MAX_KEY_CACHE", 2)

    async def scenario():
        async with _replier() as replier:
            sizes = []
            for n in range(4):
                assert await replier.gate.lookup(f"mt_wrong_{n}") is None
                sizes.append(replier.gate.cached_keys)
            principal = await replier.gate.lookup(ta.secret)
            return sizes, principal, replier.gate.cached_keys

    sizes, principal, final = asyncio.run(scenario())
    assert sizes == [1, 2, 3, 1]  # cleared once it held more than the bound
    assert principal is not None and principal.key_id == ta.key_id and final == 2


def test_events_of_unknown_sids_are_ignored(configured_db):
    async def scenario():
        async with _replier() as replier:
            await replier.intake.on_message("ghost", {"type": "sys_std", "msg_id": "x", "payload": {}})
            await replier.gate.on_disconnect("ghost")
            return replier

    replier = asyncio.run(scenario())
    assert _metric(replier, "replier_messages_in_total") == 0
    assert (
        replier.metrics.registry.get_sample_value("replier_messages_rejected_total", {"code": "invalid_payload"})
        is None
    )


def test_a_zero_dedup_ttl_forgets_envelope_ids_at_once(configured_db):
    ta = make_tenant()

    async def scenario():
        async with _replier(dedup_ttl_seconds=0) as forgetful, _replier() as remembering:
            one, two = _conn(forgetful, ta), _conn(remembering, ta)
            check = forgetful.intake.dedup.check
            first = [check(one.tenant_id, one.agent_id, "m"), check(one.tenant_id, one.agent_id, "m")]
            check = remembering.intake.dedup.check
            second = [check(two.tenant_id, two.agent_id, "m"), check(two.tenant_id, two.agent_id, "m")]
            return first, second

    forgetful, remembering = asyncio.run(scenario())
    assert forgetful == [None, None]
    assert remembering == [None, "pending"]


# -- processing -------------------------------------------------------------------------------------
def test_a_database_failure_gets_an_internal_error_on_both_protocols(configured_db, caplog):
    ta = make_tenant()

    async def scenario():
        async with _replier() as replier:
            api, legacy, leaver = _conn(replier, ta, API), _conn(replier, ta, LEGACY), _conn(replier, ta)
            await asyncio.to_thread(replier.store.stop)  # every database job now fails
            await replier.streams.accept(api, _inbound("ie-1", user_id="u-api"))
            await replier.streams.accept(legacy, _inbound("ie-2", user_id="u-legacy", protocol=LEGACY))
            await replier.streams.accept(leaver, _inbound("ie-3", user_id="u-leaver"))
            replier.connections.remove(leaver.sid)  # nobody to tell about the third one
            await _settle(replier)
            return replier

    with caplog.at_level(logging.ERROR, "replier"):
        replier = asyncio.run(scenario())
    assert _rejected(replier, "internal_error") == 2
    assert "processing message 'ie-1' failed" in caplog.text and "StoreClosed" in caplog.text
    assert ta.history("qq", user_id="u-api") == []


def test_a_deleted_agent_gets_agent_unavailable(configured_db):
    ta = make_tenant()
    ghost_agent = "agt_" + "Z" * 16

    async def scenario():
        async with _replier() as replier:
            present = _conn(replier, ta, agent_id=ghost_agent)
            gone = _conn(replier, ta, agent_id=ghost_agent)
            await replier.streams.accept(present, _inbound("na-1"))
            await replier.streams.accept(gone, _inbound("na-2", user_id="u2"))
            replier.connections.remove(gone.sid)  # left before its message was processed
            await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    assert _rejected(replier, "agent_unavailable") == 1


def test_replies_are_stored_even_when_the_sender_left(configured_db):
    """Offline agent without memory: the exchange is stored although nobody is left to receive it."""
    ta = make_tenant(config={"memory": {"enabled": False}})

    async def scenario():
        async with _replier() as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("gone-1", text="my name is Quinn", user_id="leaver"))
            replier.connections.remove(conn.sid)
            await _settle(replier)
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("gone-1", text="my name is Quinn", user_id="leaver"))
            replier.connections.remove(conn.sid)  # the replay finds nobody either
            await _settle(replier)
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("gone-2", text="my name is Quinn", user_id="leaver"))
            replier.connections.remove(conn.sid)  # answered inline by the cached offline agent
            await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    history = ta.history("qq", user_id="leaver")
    assert [(m["direction"], m["message_id"]) for m in history] == [
        ("in", "gone-1"),
        ("out", "mt-reply:gone-1"),
        ("in", "gone-2"),
        ("out", "mt-reply:gone-2"),
    ]
    assert _metric(replier, "replier_messages_out_total") == 0
    assert _metric(replier, "replier_duplicates_total") == 1
    assert Scoped(ta.ctx).memories.list() == []  # memory is disabled for this agent


def test_a_disabled_agent_answers_nobody_who_left(configured_db):
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).agents.update(ta.agent_id, status="disabled")

    async def scenario():
        async with _replier() as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("dis-1"))
            replier.connections.remove(conn.sid)
            await _settle(replier)
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("dis-2"))
            await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    assert _rejected(replier, "agent_disabled") == 1  # only the one still connected was told
    assert [m["message_id"] for m in ta.history("qq", user_id="u1")] == ["dis-1", "dis-2"]


def test_an_agent_switched_from_offline_to_a_model_is_answered_by_the_model(configured_db, fake_llm):
    ta = make_tenant()

    async def scenario():
        async with _replier(llm_memory_extraction=False) as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("sw-1", text="before", user_id="switcher"))
            await _settle(replier)
            llm = {"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-echo"}
            await asyncio.to_thread(Scoped(IsolationContext(ta.tenant_id)).agents.update, ta.agent_id, llm=llm)
            await replier.streams.accept(conn, _inbound("sw-2", text="after", user_id="switcher"))
            await _settle(replier)

    asyncio.run(scenario())
    texts = [m["text"] for m in ta.history("qq", user_id="switcher") if m["direction"] == "out"]
    assert texts[0].startswith("[offline]") and texts[1] == "LLM reply to: U: after"
    usage = Scoped(ta.stream_ctx("qq", user_id="switcher")).llm_usage.list()
    assert sorted(u["provider"] for u in usage) == ["offline", "openai"]


def test_a_stream_deleted_behind_the_cache_is_created_again(configured_db):
    ta = make_tenant()

    async def scenario():
        async with _replier() as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("del-1", user_id="cleaned"))
            await _settle(replier)
            await asyncio.to_thread(delete_agent_history, IsolationContext(ta.tenant_id), ta.agent_id)
            await replier.streams.accept(conn, _inbound("del-2", user_id="cleaned"))
            await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    history = ta.history("qq", user_id="cleaned")
    assert [(m["direction"], m["message_id"]) for m in history] == [("in", "del-2"), ("out", "mt-reply:del-2")]
    assert _rejected(replier, "internal_error") == 0
    assert _metric(replier, "replier_messages_out_total") == 2


def test_stream_caches_stay_bounded(configured_db, monkeypatch):
    monkeypatch.setattr(stream_cache, "MAX_KNOWN_STREAMS", 2)
    monkeypatch.setattr(stream_cache, "MAX_CACHED_STREAMS", 2)
    ta = make_tenant()

    async def scenario():
        async with _replier() as replier:
            conn = _conn(replier, ta)
            for n in range(5):
                await replier.streams.accept(conn, _inbound(f"lru-{n}", user_id=f"peer-{n}"))
                await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    assert replier.answerer.cache.known_streams == 2
    assert replier.answerer.cache.cached_streams <= 3
    assert _metric(replier, "replier_messages_out_total") == 5  # every stream still got its reply


def test_cached_history_is_used_within_the_cache_time(configured_db, fake_llm):
    ta = make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-echo"})

    async def scenario():
        async with _replier(context_cache_seconds=60, agent_cache_seconds=60, llm_memory_extraction=False) as replier:
            conn = _conn(replier, ta)
            for n, text in enumerate(["first words", "second words"]):
                await replier.streams.accept(conn, _inbound(f"hist-{n}", text=text, user_id="cache-user"))
                await _settle(replier)
            return replier

    asyncio.run(scenario())
    prompt = next(
        r["messages"] for r in fake_llm.requests if r["messages"] and r["messages"][-1]["content"] == "U: second words"
    )
    assert [m["content"] for m in prompt[1:]] == [
        "U: first words",
        "LLM reply to: U: first words",
        "U: second words",
    ]


def test_a_failing_memory_extraction_keeps_the_reply(configured_db, fake_llm, caplog):
    ta = make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-nomemory"})

    async def scenario():
        async with _replier() as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("mem-1", text="my name is Ada", user_id="ada"))
            replier.connections.remove(conn.sid)
            await _settle(replier)
            return replier

    with caplog.at_level(logging.INFO, "replier"):
        replier = asyncio.run(scenario())
    assert "memory extraction failed" in caplog.text
    history = ta.history("qq", user_id="ada")
    assert history[-1]["text"] == "LLM reply to: U: my name is Ada"
    assert Scoped(ta.ctx).memories.list() == []
    usage = Scoped(ta.stream_ctx("qq", user_id="ada")).llm_usage.list()
    assert [u["outcome"] for u in usage] == ["ok"]
    assert _metric(replier, "replier_llm_requests_total", provider="openai", outcome="ok") == 1


def test_draining_waits_only_the_grace_time_and_refuses_new_messages(configured_db, fake_llm, caplog):
    ta = make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-delay"})

    async def scenario():
        async with _replier(llm_memory_extraction=False) as replier:
            conn = _conn(replier, ta)
            await replier.streams.accept(conn, _inbound("dr-1", text="slow one", user_id="drainer"))
            await replier.streams.accept(conn, _inbound("dr-2", text="queued behind it", user_id="drainer"))
            await replier.drain(0.2)
            await replier.streams.accept(conn, _inbound("dr-3", text="too late", user_id="drainer"))
            await _settle(replier)  # the two accepted ones still finish
            return replier

    with caplog.at_level(logging.WARNING, "replier"):
        replier = asyncio.run(scenario())
    assert "2 replies still in flight after 0.2s; closing anyway" in caplog.text
    assert _rejected(replier, "shutting_down") == 1
    ids = [m["message_id"] for m in ta.history("qq", user_id="drainer")]
    # dr-2 arrived while its stream was busy: it was stored (and acknowledged) at once.
    assert ids == ["dr-1", "dr-2", "mt-reply:dr-1", "mt-reply:dr-2"]


# -- background loops -------------------------------------------------------------------------------
def test_background_loops_log_failures_and_end_when_the_store_closes(configured_db, caplog):
    ta = make_tenant()

    async def scenario():
        async with _replier(revocation_check_seconds=0.05, usage_flush_seconds=0.05) as replier:
            # A connection whose tenant id cannot form a context makes both jobs fail in the database thread.
            broken = _conn(replier, ta, tenant_id="")
            replier.gate.usage.count("", ta.key_id)
            replier.start()
            await wait_for(lambda: "revocation check failed" in caplog.text)
            await wait_for(lambda: "recording api key usage failed" in caplog.text)
            revocation, usage = replier.tasks[:2]
            assert not revocation.done() and not usage.done()  # a failure does not end a loop
            await asyncio.to_thread(replier.store.stop)
            replier.gate.usage.count(ta.tenant_id, ta.key_id)
            await asyncio.wait_for(asyncio.gather(revocation, usage), 5)
            assert broken.sid in replier.connections.by_sid
            return revocation, usage

    with caplog.at_level(logging.ERROR, "replier"):
        revocation, usage = asyncio.run(scenario())
    assert revocation.exception() is None and usage.exception() is None


def test_key_use_that_cannot_be_written_is_kept_for_the_next_flush(configured_db):
    from isolation import IsolationContext, Scoped
    from replier.store import StoreClosed

    ta = make_tenant()

    async def scenario():
        async with _replier() as replier:
            usage = replier.gate.usage
            usage.count(ta.tenant_id, ta.key_id)
            usage.count(ta.tenant_id, ta.key_id)
            stopped, replier.store._closed = replier.store._closed, True  # the store refuses work
            try:
                with pytest.raises(StoreClosed):
                    await usage.flush()
            finally:
                replier.store._closed = stopped
            await usage.flush()  # the two uses were kept and are written now

    asyncio.run(scenario())
    keys = Scoped(IsolationContext(ta.tenant_id)).api_keys.list(ta.agent_id)
    assert next(k for k in keys if k["id"] == ta.key_id)["usage_count"] == 2


def test_gc_freezing_follows_the_connection_count(configured_db):
    ta = make_tenant()

    async def scenario():
        async with _replier(gc_freeze=False) as off:
            await asyncio.wait_for(off.gc_freeze_loop(), 1)  # disabled: returns at once
        async with _replier(gc_freeze=True) as replier:
            task = asyncio.create_task(replier.gc_freeze_loop())
            try:
                conns = [_conn(replier, ta) for _ in range(50)]
                await wait_for(lambda: replier.frozen_at == 50)
                frozen = gc.get_freeze_count()
                for conn in conns[:10]:
                    replier.connections.remove(conn.sid)
                await wait_for(lambda: replier.frozen_at == 40)
                assert gc.get_freeze_count() > frozen // 2  # a few connections gone: still frozen
                for conn in conns[10:30]:
                    replier.connections.remove(conn.sid)
                await wait_for(lambda: replier.frozen_at == 20)
                # Most of the frozen connections are gone: what was frozen is collectable again.
                assert gc.get_freeze_count() == 0
                return frozen
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        assert asyncio.run(scenario()) > 0
    finally:
        gc.unfreeze()
