"""The message lifecycle in-process (a real `Replier`, `Store` and database; see test_paths_pipeline):
the acknowledgement means "stored", duplicate envelopes, reused message ids."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import timedelta

import peewee
import pytest
from replier_support import api_message, make_tenant
from test_paths_pipeline import _conn, _replier, _settle

from isolation import Scoped, fastpath
from isolation import db as isolation_db
from isolation.ids import utcnow
from replier import db_jobs


def _envelope(msg_id: str, message) -> dict:
    return {"ver": 1, "msg_id": msg_id, "type": "sys_std", "meta": {}, "payload": message.to_dict()}


def _spy_acks(replier, ta, user_id: str) -> list[tuple[str, bool]]:
    """(msg_id, whether its message was stored at that moment) of every ack the replier sends."""
    acks: list[tuple[str, bool]] = []
    original = replier.outbox.ack
    stream = ta.stream_ctx("qq", user_id=user_id)

    async def ack(conn, msg_id):
        stored = (
            {m["message_id"] for m in Scoped(stream).messages.history(100)} if _stream_exists(ta, user_id) else set()
        )
        acks.append((msg_id, msg_id.removeprefix("env-") in stored))
        await original(conn, msg_id)

    replier.outbox.ack = ack
    return acks


def _stream_exists(ta, user_id: str) -> bool:
    return any(s["user_id"] == user_id for s in Scoped(ta.ctx.child(platform="qq")).chat_streams.list())


def test_acks_come_only_after_the_message_is_stored_idle_or_busy(configured_db, fake_llm):
    ta = make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-delay"})

    async def scenario():
        async with _replier(llm_memory_extraction=False) as replier:
            acks = _spy_acks(replier, ta, "acker")
            conn = _conn(replier, ta)
            for i in range(3):  # the first finds the stream idle, the next two find it busy
                message = api_message(f"text {i}", message_id=f"a-{i}", user_id="acker")
                await replier.intake.on_message(conn.sid, _envelope(f"env-a-{i}", message))
            # The busy stream's messages are stored and acknowledged long before their answers.
            for _ in range(100):
                if len(acks) == 3:
                    break
                await asyncio.sleep(0.02)
            early = list(acks)
            await _settle(replier)
            return early, acks

    early, acks = asyncio.run(scenario())
    assert early == [("env-a-0", True), ("env-a-1", True), ("env-a-2", True)]
    assert acks == early


def test_a_duplicate_envelope_is_acked_only_once_stored_and_a_failed_store_never(configured_db, fake_llm):
    ta = make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-delay"})

    async def scenario():
        async with _replier(llm_memory_extraction=False) as replier:
            acks = _spy_acks(replier, ta, "dup")
            conn = _conn(replier, ta)
            first = api_message("busy the stream", message_id="d-0", user_id="dup")
            await replier.intake.on_message(conn.sid, _envelope("env-d-0", first))
            message = api_message("twice", message_id="d-1", user_id="dup")
            await replier.intake.on_message(conn.sid, _envelope("env-d-1", message))
            await replier.intake.on_message(conn.sid, _envelope("env-d-1", message))  # before its store commits
            await _settle(replier)
            pending = [msg_id for msg_id, _ in acks]
            await replier.intake.on_message(conn.sid, _envelope("env-d-1", message))  # stored: acked again
            again = [msg_id for msg_id, _ in acks]
            # The database is gone: an error, never an ack; the envelope id is forgotten.
            await asyncio.to_thread(replier.store.stop)
            lost = api_message("not stored", message_id="d-2", user_id="dup")
            await replier.intake.on_message(conn.sid, _envelope("env-d-2", lost))
            await _settle(replier)
            return (
                pending,
                again,
                [msg_id for msg_id, _ in acks],
                replier.intake.dedup.check(ta.tenant_id, ta.agent_id, "env-d-2"),
            )

    pending, again, final, state = asyncio.run(scenario())
    assert pending == ["env-d-0", "env-d-1"]
    assert again == ["env-d-0", "env-d-1", "env-d-1"]
    assert final == again
    assert state is None  # forgotten after the failure (check() now remembers it as new)
    ids = [m["message_id"] for m in ta.history("qq", user_id="dup")]
    assert ids.count("d-1") == 1 and ids.count("mt-reply:d-1") == 1 and "d-2" not in ids


def test_reused_ids_are_new_messages_unless_an_identical_resend_in_the_window(configured_db):
    ta = make_tenant()
    ctx = ta.stream_ctx("qq", user_id="reuser")
    Scoped(ta.ctx.child(platform="qq")).chat_streams.get_or_create(user_id="reuser")
    fields = {"direction": "in", "segments": {}, "sender_user_id": "reuser"}

    def store(message_id: str, text: str, window: float) -> tuple[str, bool]:
        with isolation_db.unit_of_work(write=True):
            return fastpath.ChatSession(ctx).store_inbound(
                content_hash=text * 8, replay_window=window, message_id=message_id, text=text, **fields
            )

    assert store("m", "aa", 3600) == ("m", True)
    assert store("m", "aa", 3600) == ("m", False)  # identical resend: the stored one
    other, created = store("m", "bb", 3600)
    assert created and other == "m#" + ("bb" * 8)[:16]
    assert store("m", "bb", 3600) == (other, False)
    # Past the window: the same content again is a new message, under the next derived id each time.
    time.sleep(0.05)
    after, created = store("m", "aa", 0.01)
    assert created and after == "m#" + ("aa" * 8)[:16]
    time.sleep(0.05)
    window_id, created = store("m", "aa", 0.01)
    assert created and window_id.startswith(after + ".")
    # Without a window every candidate is taken: a fresh random id.
    fresh, created = store("m", "aa", 0)
    assert created and fresh.startswith("m#") and fresh not in ("m", other, after, window_id)
    # Long ids are cut so that the reply id fits the column.
    long_id, created = store("x" * 100, "cc", 3600)
    assert created and long_id == "x" * 100
    derived, created = store("x" * 100, "dd", 3600)
    assert created and len(derived) == 80 + 1 + 16 and len("mt-reply:" + derived) <= 128
    assert fastpath.inbound_id_candidates("m", "f" * 64, utcnow(), 0) == ["m", "m#" + "f" * 16]


@pytest.mark.parametrize("ttl", [3600.0])
def test_a_reused_id_with_new_text_is_stored_and_answered(configured_db, ttl):
    ta = make_tenant()

    async def scenario():
        async with _replier(dedup_ttl_seconds=ttl) as replier:
            conn = _conn(replier, ta)
            for msg_id, text in (("e1", "first text"), ("e2", "second text"), ("e3", "first text")):
                message = api_message(text, message_id="same-id", user_id="reuse")
                await replier.intake.on_message(conn.sid, _envelope(msg_id, message))
                await _settle(replier)
            return replier

    replier = asyncio.run(scenario())
    rows = ta.history("qq", user_id="reuse")
    inbound = [(m["message_id"], m["text"]) for m in rows if m["direction"] == "in"]
    assert inbound[0] == ("same-id", "first text")
    assert inbound[1][0].startswith("same-id#") and inbound[1][1] == "second text"
    assert len(inbound) == 2  # the identical resend was a replay
    replies = [m["message_id"] for m in rows if m["direction"] == "out"]
    assert replies == ["mt-reply:same-id", "mt-reply:" + inbound[1][0]]
    assert replier.metrics.registry.get_sample_value("replier_duplicates_total") == 1


# -- recovery and delivery state ---------------------------------------------------------------------
def _stored_unanswered(ta, user_id: str, message_id: str, seconds_ago: float = 30.0) -> None:
    ctx = ta.stream_ctx("qq", user_id=user_id)
    Scoped(ta.ctx.child(platform="qq")).chat_streams.get_or_create(user_id=user_id)
    Scoped(ctx).messages.add(
        message_id=message_id,
        direction="in",
        text=f"stored {message_id}",
        segments={"type": "text", "data": f"stored {message_id}"},
        sender_user_id=user_id,
        created_at=utcnow() - timedelta(seconds=seconds_ago),
    )


def _record_recovered(replier, tenants: set[str], answer: bool = True) -> list:
    """The recovered messages of `tenants` queued from now on (the leg's database is shared by the
    whole session: other tests' messages may be found too, and are left alone)."""
    queued: list = []
    original = replier.streams.enqueue_recovered

    def enqueue(key, inbound, stored_id):
        if key[0] not in tenants:
            return
        queued.append((key, stored_id))
        if answer:
            original(key, inbound, stored_id)

    replier.streams.enqueue_recovered = enqueue
    return queued


def test_recovery_answers_stored_unanswered_messages_once_in_their_tenant(configured_db):
    ta, other = make_tenant(), make_tenant()
    _stored_unanswered(ta, "rec", "r-1")
    _stored_unanswered(ta, "rec", "r-2")
    _stored_unanswered(other, "rec", "r-1")  # the same ids in another tenant: its own answer
    _stored_unanswered(ta, "rec-young", "young", seconds_ago=0)  # may still be in flight elsewhere
    _stored_unanswered(ta, "rec-old", "old", seconds_ago=3600)  # past the recovery age
    disabled = make_tenant()
    _stored_unanswered(disabled, "rec", "off-1")
    Scoped(disabled.ctx).agents.update(disabled.agent_id, status="disabled")

    async def scenario():
        async with _replier(recovery_grace_seconds=5, recovery_max_age_seconds=600) as replier:
            _conn(replier, ta)  # the agent's adapter on "qq": recovered replies go to it
            queued = _record_recovered(replier, {ta.tenant_id, other.tenant_id, disabled.tenant_id})
            await replier.recovery.run_once()
            first = len(queued)
            await replier.recovery.run_once()  # while they are queued / being answered: skipped
            again = len(queued) - first
            await _settle(replier)
            await replier.deliveries.flush()
            await replier.recovery.run_once()  # answered: nothing left
            return first, again, len(queued) - first - again

    assert asyncio.run(scenario()) == (3, 0, 0)
    rows = ta.history("qq", user_id="rec")
    assert [m["message_id"] for m in rows] == ["r-1", "r-2", "mt-reply:r-1", "mt-reply:r-2"]
    # Handed to the agent's connection (it joined the stream), so marked delivered.
    assert all(m["delivered_at"] is not None for m in rows if m["direction"] == "out")
    assert len(other.history("qq", user_id="rec")) == 2
    assert len(ta.history("qq", user_id="rec-young")) == 1
    assert len(ta.history("qq", user_id="rec-old")) == 1
    assert len(disabled.history("qq", user_id="rec")) == 1


def test_a_slow_recovery_scan_holds_up_no_chat_message(configured_db, monkeypatch):
    """The scan across tenants runs on a thread and connection of its own. As a store job it shared
    its batch's transaction with chat messages, and a slow scan (a PostgreSQL without statistics
    took 1.7 s) held every one of them up: here the store has a single worker, as on SQLite."""
    ta = make_tenant()
    release = threading.Event()
    scanning = threading.Event()

    def slow_scan(*args):
        scanning.set()
        release.wait(20)
        return []  # what it finds is the other recovery tests' part (the leg's database is shared)

    monkeypatch.setattr(db_jobs, "unanswered_keys", slow_scan)

    async def scenario():
        async with _replier(recovery_grace_seconds=0) as replier:
            conn = _conn(replier, ta)
            scan = asyncio.create_task(replier.recovery.run_once())
            try:
                assert await asyncio.to_thread(scanning.wait, 10)
                message = api_message("while the scan runs", message_id="during-scan", user_id="scan-user")
                await replier.intake.on_message(conn.sid, _envelope("env-during-scan", message))
                answered = False
                for _ in range(250):  # up to 5 s, the scan still blocked
                    if any(m["message_id"] == "mt-reply:during-scan" for m in ta.history("qq", user_id="scan-user")):
                        answered = True
                        break
                    await asyncio.sleep(0.02)
                still_scanning = not scan.done()
            finally:
                release.set()
            await scan
            await _settle(replier)
            return answered, still_scanning

    answered, still_scanning = asyncio.run(scenario())
    assert still_scanning and answered, "a chat message waited for the recovery scan"


def test_a_message_answered_while_the_scan_ran_is_not_queued_again(configured_db, monkeypatch):
    """The scan runs on a connection of its own, so it can find a message whose reply this process
    commits right after: the message is no longer in flight when the scan returns, and only the
    database can tell it was answered (CI saw such messages queued a second time)."""
    ta = make_tenant()
    _stored_unanswered(ta, "raced", "q-1")
    real_scan = db_jobs.unanswered_keys

    def scan_then_answer(*args):
        found = real_scan(*args)
        with isolation_db.connection():  # the answer commits while the scan's result is on its way
            Scoped(ta.stream_ctx("qq", user_id="raced")).messages.add(
                message_id="mt-reply:q-1", direction="out", text="answered meanwhile", segments={}, reply_to="q-1"
            )
        return found

    monkeypatch.setattr(db_jobs, "unanswered_keys", scan_then_answer)

    async def scenario():
        async with _replier(recovery_grace_seconds=5, recovery_max_age_seconds=600) as replier:
            queued = _record_recovered(replier, {ta.tenant_id})
            await replier.recovery.run_once()
            await _settle(replier)
            return queued

    assert asyncio.run(scenario()) == []
    assert [m["message_id"] for m in ta.history("qq", user_id="raced")] == ["q-1", "mt-reply:q-1"]


def test_recovery_passes_during_an_outage_go_on_without_a_traceback_each(configured_db, monkeypatch, caplog):
    """A pass that meets an outage goes to the throttled fault log (one line per kind and interval),
    not `recovery pass failed` with a traceback every interval, and the next pass still runs."""
    calls = 0

    def outage(*args):
        nonlocal calls
        calls += 1
        raise peewee.OperationalError("database is locked")

    monkeypatch.setattr(db_jobs, "unanswered_keys", outage)

    async def scenario():
        async with _replier(recovery_grace_seconds=0, recovery_interval_seconds=0.02) as replier:
            loop = asyncio.create_task(replier.recovery_loop())
            for _ in range(250):
                if calls >= 3:
                    break
                await asyncio.sleep(0.02)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert calls >= 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # no `log.exception`
    # One WARNING for the episode at most (the fault log is per process: another test's outage within
    # its interval may have used it), not one per pass.
    assert len([r for r in caplog.records if "recovery pass" in r.getMessage()]) <= 1, caplog.text


def test_recovery_gives_up_after_a_few_attempts_and_can_be_turned_off(configured_db):
    ta = make_tenant()
    _stored_unanswered(ta, "stuck", "s-1")

    async def scenario():
        async with _replier(recovery_max_age_seconds=0) as off:
            assert await off.recovery.run_once() == 0
            assert await off.deliveries.on_connect(_conn(off, ta)) == 0
        async with _replier(recovery_grace_seconds=0) as replier:
            queued = _record_recovered(replier, {ta.tenant_id}, answer=False)  # never answered
            counts = []
            for _ in range(4):
                before = len(queued)
                await replier.recovery.run_once()
                counts.append(len(queued) - before)
            await _settle(replier)
            return counts

    assert asyncio.run(scenario()) == [1, 1, 1, 0]


def test_undelivered_replies_go_to_one_connection_and_delivered_marks_are_coalesced(configured_db):
    ta = make_tenant()
    _stored_unanswered(ta, "ud", "u-1")
    ctx = ta.stream_ctx("qq", user_id="ud")
    for i in range(3):
        Scoped(ctx).messages.add(
            message_id=f"mt-reply:u-{i}", direction="out", text=f"reply {i}", segments={}, reply_to=f"u-{i}"
        )
    wechat = ta.stream_ctx("wechat", user_id="ud")
    Scoped(ta.ctx.child(platform="wechat")).chat_streams.get_or_create(user_id="ud")
    Scoped(wechat).messages.add(message_id="mt-reply:w-1", direction="out", text="other platform", segments={})

    async def scenario():
        async with _replier() as replier:
            first, second = _conn(replier, ta), _conn(replier, ta)
            batches = replier.store.batches
            sent = await asyncio.gather(replier.deliveries.on_connect(first), replier.deliveries.on_connect(second))
            await replier.deliveries.flush()
            jobs = replier.store.batches - batches
            gone = _conn(replier, ta)
            replier.connections.remove(gone.sid)
            late = await replier.deliveries.on_connect(gone)
            return sorted(sent), jobs, late

    sent, jobs, late = asyncio.run(scenario())
    assert sent == [0, 3]  # the qq replies, to exactly one of the two connections
    assert late == 0
    assert jobs <= 4  # two reads and the marks of one event-loop turn in one job
    qq = [m for m in ta.history("qq", user_id="ud") if m["direction"] == "out"]
    assert all(m["delivered_at"] is not None for m in qq)
    assert Scoped(wechat).messages.by_message_id("mt-reply:w-1")["delivered_at"] is None
