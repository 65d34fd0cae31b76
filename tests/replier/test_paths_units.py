"""In-process tests of the replier's parsing, validation, provider and database-job edge paths."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace

import pytest
from replier_support import api_message, free_port, legacy_message, make_tenant

from isolation import IsolationContext, Scoped, fastpath
from isolation import db as isolation_db
from isolation.agent_config import AgentConfig, LlmSettings, Persona
from isolation.egress import EgressSettings
from isolation.ids import utcnow
from isolation.models import ChatStream
from replier import db_jobs
from replier.connections import Connection, ConnectionRegistry
from replier.inbound import encoded_size
from replier.llm import LlmError, LlmRequest, resolve_provider_config
from replier.llm.base import LlmDefaults, persona_text
from replier.llm.offline import OfflineProvider, rule_memory
from replier.llm.openai import OpenAIProvider
from replier.llm.registry import make_provider
from replier.memory import worth_storing
from replier.protocol import (
    BadInput,
    Inbound,
    _peers,
    parse_api_message,
    parse_envelope,
    parse_legacy_message,
    segment_text,
)
from replier.store import Store, StoreClosed
from testsupport.wiretrace import WireTrace


def _code(fn, *args) -> str:
    with pytest.raises(BadInput) as err:
        fn(*args)
    return err.value.code


def _api(**info_changes) -> dict:
    payload = api_message("hello", message_id="p-1", user_id="u1").to_dict()
    payload["message_info"].update(info_changes)
    return {"ver": 1, "msg_id": "env", "type": "sys_std", "payload": payload}


def _parse_api(data: dict):
    return parse_api_message(parse_envelope(data), data, 1000)


# -- protocol ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"message_id": True}, "invalid_field"),  # a bool is not an id
        ({"message_id": ["x"]}, "invalid_field"),
        ({"message_id": "x" * 101}, "invalid_field"),
        ({"message_id": "bad\nid"}, "invalid_field"),
        ({"message_id": "   "}, "invalid_field"),
        ({"platform": "x" * 65}, "invalid_field"),
        ({"time": -1}, "invalid_field"),
        ({"time": float("nan")}, "invalid_field"),
    ],
)
def test_api_message_id_platform_and_time_are_validated(changes, code):
    assert _code(_parse_api, _api(**changes)) == code


def test_api_message_with_integer_id_and_no_time():
    inbound = _parse_api(_api(message_id=12345))
    assert inbound.message_id == "12345"
    assert _code(_parse_api, _api(time=None)) == "invalid_payload"  # maim_message itself refuses it


def test_envelope_msg_id_that_is_not_a_short_string_is_ignored():
    for bad in (7, "", "x" * 129):
        envelope = parse_envelope({"type": "sys_std", "msg_id": bad})
        assert envelope.msg_id is None and envelope.type == "sys_std"
    assert parse_envelope({"type": "sys_std", "msg_id": "m-1"}).msg_id == "m-1"


@pytest.mark.parametrize(
    ("segment", "code"),
    [
        ("not a dict", "invalid_segment"),
        ({"type": 5, "data": "x"}, "invalid_segment"),
        ({"type": "seglist", "data": "not a list"}, "invalid_segment"),
        ({"type": "seglist", "data": [{"type": "text", "data": "x"}] * 65}, "too_many_segments"),
        ({"type": "text", "data": 42}, "invalid_segment"),
        ({"type": "text", "data": "nul\x00byte"}, "invalid_segment"),
        ({"type": "seglist", "data": ["plain string child"]}, "invalid_segment"),
        # Binary attachments of a Socket.IO binary event arrive as bytes; segments are stored as JSON.
        ({"type": "image", "data": b"\x89PNG"}, "invalid_segment"),
        ({"type": "at", "data": b"bob"}, "invalid_segment"),
        ({"type": "image", "data": {"file": {"raw": [b"\x00"]}}}, "invalid_segment"),
        ({"type": "text", "data": "hi", "extra": bytearray(b"x")}, "invalid_segment"),
        (
            {"type": "seglist", "data": [{"type": "text", "data": "hi"}, {"type": "reply", "data": b"m-1"}]},
            "invalid_segment",
        ),
    ],
)
def test_bad_segment_trees_are_refused(segment, code):
    assert _code(segment_text, segment, 1000) == code


def test_binary_segment_is_refused_with_a_clear_message_and_json_data_still_passes():
    with pytest.raises(BadInput, match="binary data"):
        segment_text({"type": "image", "data": b"\x00" * 10}, 1000)
    assert segment_text({"type": "image", "data": {"file": {"raw": ["AA=="]}}}, 1000) == "[image]"


@pytest.mark.parametrize("field", ["user_nickname", "group_name"])
def test_binary_names_are_refused_not_stored_as_their_repr(field):
    user = SimpleNamespace(user_id="u1", user_nickname="nick", user_cardname=None)
    group = SimpleNamespace(group_id="g1", group_name="group")
    setattr(user if field == "user_nickname" else group, field, b"nick")
    with pytest.raises(BadInput, match="binary data") as raised:
        _peers(user, group)
    assert raised.value.code == "invalid_field"
    user.user_nickname, group.group_name = 42, "group"
    assert _peers(user, group) == ("u1", "42", "g1", "group")  # numbers still become text


def test_segments_nest_at_most_four_levels():
    leaf = {"type": "text", "data": "deep"}
    node = leaf
    for _ in range(4):
        node = {"type": "seglist", "data": [node]}
    assert segment_text(node, 1000) == "deep"
    too_deep = {"type": "seglist", "data": [node]}
    assert _code(segment_text, too_deep, 1000) == "invalid_segment"


def test_reply_and_at_segments_shape_the_text_and_reply_to():
    seg = {
        "type": "seglist",
        "data": [
            {"type": "reply", "data": "orig-42"},
            {"type": "at", "data": "bob"},
            {"type": "text", "data": " hi"},
            {"type": "image", "data": "base64..."},
        ],
    }
    data = _api()
    data["payload"]["message_segment"] = seg
    inbound = _parse_api(data)
    assert inbound.text == "@bob hi[image]"
    assert inbound.reply_to == "orig-42"
    data["payload"]["message_segment"] = {"type": "reply", "data": "only-a-reply"}
    assert _code(_parse_api, data) == "empty_message"
    legacy = legacy_message("x", message_id="L-r").to_dict()
    legacy["message_segment"] = {"type": "seglist", "data": [{"type": "text", "data": "yo"}]}
    assert parse_legacy_message(legacy, 100).reply_to is None


def test_legacy_messages_are_validated():
    assert _code(parse_legacy_message, ["not", "a", "dict"], 100) == "invalid_message"
    custom = legacy_message("x").to_dict() | {"is_custom_message": True}
    assert _code(parse_legacy_message, custom, 100) == "unsupported_message"
    no_segment = legacy_message("x").to_dict()
    del no_segment["message_segment"]
    assert _code(parse_legacy_message, no_segment, 100) == "missing_field"
    broken = legacy_message("x").to_dict()
    broken["message_info"]["sender_info"] = {"user_info": "not an object"}
    assert _code(parse_legacy_message, broken, 100) == "invalid_message"
    untimed = legacy_message("no time given", message_id="L-t").to_dict()
    untimed["message_info"]["time"] = None
    inbound = parse_legacy_message(untimed, 100)
    assert inbound.time > 0 and inbound.text == "no time given"


# -- small helpers ---------------------------------------------------------------------------------
def test_worth_storing_drops_blank_candidates():
    assert worth_storing("   \n ", []) is None
    assert worth_storing("  likes   tea ", []) == "likes tea"


def test_encoded_size_counts_binary_attachments():
    # A Socket.IO binary event arrives as bytes; its size must count, not make the check pass.
    assert encoded_size({"blob": b"y" * 5000}) > 5000
    assert encoded_size({"a": "b"}) == len('{"a":"b"}')


def test_registry_removal_tolerates_a_stream_index_already_gone():
    registry = ConnectionRegistry()
    one = Connection("s1", "c1", "api", "k1", "t1", "a1", "qq", "secret")
    two = Connection("s2", "c2", "api", "k2", "t1", "a1", "qq", "secret")
    for conn in (one, two):
        registry.add(conn)
        registry.subscribe(conn, ("t1", "a1", "qq", "cs_1"))
    registry.subscribe(one, ("t1", "a1", "qq", "cs_2"))
    del registry.by_stream[("t1", "a1", "qq", "cs_2")]
    assert registry.remove("s1") is one
    assert registry.by_stream == {("t1", "a1", "qq", "cs_1"): {"s2"}}
    assert registry.remove("nope") is None
    assert registry.keys_by_tenant() == {"t1": {"k2"}}


def test_make_provider_kinds():
    assert isinstance(make_provider("offline"), OfflineProvider)
    with pytest.raises(ValueError, match="needs base_url and model"):
        make_provider("openai", base_url="http://x/v1")
    with pytest.raises(ValueError, match="unknown provider"):
        make_provider("anthropic")


# -- openai provider against the local double ------------------------------------------------------
def _complete(base_url: str, model: str, retries: int = 0):
    async def go():
        loopback = EgressSettings(llm_allowed_hosts="127.0.0.1")  # the fake LLM listens there
        provider = OpenAIProvider(base_url, model=model, max_retries=retries, backoff=0.01, timeout=5, egress=loopback)
        try:
            return await provider.complete(LlmRequest(messages=[], user_text="hi"))
        finally:
            await provider.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("fake-malformed", "malformed completion response"),
        ("fake-empty", "the model returned an empty reply"),
        ("fake-notjson", "completion response is not JSON"),
    ],
)
def test_openai_provider_refuses_unusable_responses(fake_llm, model, message):
    with pytest.raises(LlmError, match=message):
        _complete(fake_llm.base_url, model)


def test_openai_provider_does_not_retry_a_client_error(fake_llm):
    before = sum(1 for r in fake_llm.requests if r["model"] == "fake-400")
    with pytest.raises(LlmError, match="HTTP 400"):
        _complete(fake_llm.base_url, "fake-400", retries=3)
    assert sum(1 for r in fake_llm.requests if r["model"] == "fake-400") == before + 1


def test_openai_provider_reports_connection_errors(caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.WARNING, "replier.llm.openai"), pytest.raises(LlmError, match="ConnectError"):
        _complete(url, "m", retries=1)
    assert any("LLM call to" in r.getMessage() for r in caplog.records)


# -- database jobs ----------------------------------------------------------------------------------
def test_stored_settings_that_do_not_validate_fall_back_to_defaults(caplog):
    with caplog.at_level(logging.WARNING, "replier.db"):
        config = db_jobs._parse(AgentConfig, {"chat": {"max_context_size": "many"}})
    assert config == AgentConfig()
    assert "stored AgentConfig does not validate" in caplog.text
    assert db_jobs._parse(Persona, None) == Persona()


def test_an_undecryptable_llm_key_is_ignored(configured_db, caplog):
    ta = make_tenant()
    Scoped(IsolationContext(ta.tenant_id)).agents.update(ta.agent_id, encrypted_api_key="not-an-encrypted-secret")
    with caplog.at_level(logging.WARNING, "replier.db"):
        view = db_jobs.load_agent(ta.ctx)
    assert view.llm_api_key is None
    assert "cannot be decrypted" in caplog.text


def _inbound(message_id: str, user_id: str = "u1", text: str = "hello") -> Inbound:
    seg = {"type": "text", "data": text}
    return Inbound("api", None, message_id, "qq", 1.0, text, seg, user_id, None, None, None)


def test_ingest_checks_its_context_and_touches_known_streams(configured_db):
    ta = make_tenant(config={"memory": {"enabled": False}})
    tap = IsolationContext(ta.tenant_id, ta.agent_id, "qq")
    with pytest.raises(ValueError, match="T\\+A\\+C\\+P"):
        db_jobs.ingest(db_jobs.IngestRequest(tap, _inbound("i-0")))
    other = tap.child(chat_stream_id=Scoped(tap).chat_streams.stream_id_for("private", "someone-else"))
    with pytest.raises(ValueError, match="does not match"):
        db_jobs.ingest(db_jobs.IngestRequest(other, _inbound("i-1")))
    ctx = ta.stream_ctx("qq", user_id="u1")
    with isolation_db.unit_of_work(write=True):
        first = db_jobs.ingest(db_jobs.IngestRequest(ctx, _inbound("i-2")))
    assert first.created and first.memories == []  # memory disabled: nothing read
    before = Scoped(tap).chat_streams.get(ctx.chat_stream_id)["last_active_at"]
    # Asked to answer offline, but the operator's default now names a model: the job leaves the answer
    # to the provider and stores nothing for it.
    with_model = LlmDefaults(provider="openai", base_url="http://127.0.0.1:9/v1", model="m")
    request = db_jobs.IngestRequest(
        ctx, _inbound("i-3"), stream_known=True, cached_agent=first.agent, check_agent=False, touch=True,
        offline=db_jobs.AnswerOffline(with_model),
    )  # fmt: skip
    with isolation_db.unit_of_work(write=True):
        second = db_jobs.ingest(request)
    assert second.answer is None
    assert Scoped(tap).chat_streams.get(ctx.chat_stream_id)["last_active_at"] >= before
    assert [m["message_id"] for m in ta.history("qq", user_id="u1")] == ["i-2", "i-3"]


def test_an_offline_answer_is_stored_with_its_message_in_one_round_trip(configured_db, tmp_path):
    ta = make_tenant(config={"memory": {"enabled": False}})
    ctx = ta.stream_ctx("qq", user_id="u1")
    with isolation_db.unit_of_work(write=True):
        first = db_jobs.ingest(db_jobs.IngestRequest(ctx, _inbound("i-1")))
    offline = db_jobs.AnswerOffline(LlmDefaults())

    def ingest(message_id: str, text: str = "hello") -> db_jobs.IngestResult:
        request = db_jobs.IngestRequest(
            ctx, _inbound(message_id, text=text), stream_known=True, cached_agent=first.agent, check_agent=False,
            need_history=False, need_memories=False, offline=offline,
        )  # fmt: skip
        with isolation_db.unit_of_work(write=True):
            return db_jobs.ingest(request)

    with isolation_db.connection():
        for n in range(6):  # psycopg prepares a statement at its 5th use, with a round trip of its own
            assert ingest(f"w-{n}").answer is not None
        if isolation_db.is_postgres():
            with WireTrace(isolation_db.database.obj, tmp_path / "trace") as trace:
                new = ingest("i-2")
            assert trace.round_trips() == 2  # BEGIN + binding + message, reply and usage; COMMIT
        else:
            new = ingest("i-2")
    assert new.created and new.answer is not None and new.answer.reply_id == "mt-reply:i-2"
    # A resend is answered from the stored reply; a reused id with new content is a new message.
    resent = ingest("i-2")
    assert not resent.created and resent.reply == {"message_id": "mt-reply:i-2", "text": new.answer.text}
    reused = ingest("i-2", text="something else")
    assert reused.created and reused.stored_id.startswith("i-2#") and reused.answer.reply_id.endswith(reused.stored_id)
    history = [(m["message_id"], m["direction"]) for m in ta.history("qq", user_id="u1")]
    assert history[:3] == [("i-1", "in"), ("w-0", "in"), ("mt-reply:w-0", "out")]
    assert history[13:] == [
        ("i-2", "in"), ("mt-reply:i-2", "out"),
        (reused.stored_id, "in"), ("mt-reply:" + reused.stored_id, "out"),
    ]  # fmt: skip
    # Answered first elsewhere (another replier stored the reply before this message's row): that
    # answer stands and is sent as a replay; no second usage row.
    with isolation_db.unit_of_work(write=True):
        assert fastpath.ChatSession(ctx).insert_reply_with_usage(
            {"message_id": "mt-reply:i-9", "direction": "out", "text": "the first answer", "segments": []},
            {"provider": "offline", "model": "offline", "outcome": "offline"},
        )
    late = ingest("i-9")
    assert late.created and late.answer.text == "the first answer" and late.answer.metadata["replayed"] is True
    usage = Scoped(ctx).llm_usage.list()
    assert len(usage) == 9 and {u["chat_stream_id"] for u in usage} == {ctx.chat_stream_id}


# -- store ------------------------------------------------------------------------------------------
def test_store_finishes_queued_jobs_on_stop_and_then_refuses_work(configured_db):
    started, release = threading.Event(), threading.Event()

    def blocker():
        started.set()
        release.wait(10)
        return "first"

    async def scenario():
        store = Store(workers=1, batch_max=64, checkpoint_seconds=0)
        store.start()
        first = store.run(blocker)
        await asyncio.to_thread(started.wait, 10)
        queued = [store.run(lambda n=n: n * 2) for n in range(3)]
        queued[0].cancel()  # the caller gave up: its result is dropped, the others still arrive
        stopping = asyncio.create_task(asyncio.to_thread(store.stop))
        while store._queue.qsize() < 4:  # the three jobs and the stop marker, one batch
            await asyncio.sleep(0.01)
        release.set()
        await stopping
        results = await asyncio.gather(first, *queued[1:])
        with pytest.raises(StoreClosed):
            store.run(blocker)
        store.stop()  # a second stop is a no-op
        return results, store.batches, store.jobs

    results, batches, jobs = asyncio.run(scenario())
    assert results == ["first", 2, 4]
    assert (batches, jobs) == (2, 4)


def _commit_setting() -> str:
    """The current transaction's `synchronous_commit` ("sqlite" there: it has no such setting)."""
    if not isolation_db.is_postgres():
        return "sqlite"
    return isolation_db.database.execute_sql("SELECT current_setting('synchronous_commit')").fetchone()[0]


def test_chat_batches_commit_without_flush_only_when_configured_and_only_in_their_transaction(configured_db):
    def failing():
        raise ValueError("this job fails: the batch runs again, one savepoint per job")

    async def scenario():
        store = Store(workers=1, batch_max=64, checkpoint_seconds=0, synchronous_commit=False)
        store.start()
        relaxed = await store.run(_commit_setting)
        together = await asyncio.gather(store.run(_commit_setting), store.run(failing), return_exceptions=True)
        store.synchronous_commit = True  # the same worker and connection: the next transaction is durable
        durable = await store.run(_commit_setting)
        await asyncio.to_thread(store.stop)
        return relaxed, together, durable

    relaxed, together, durable = asyncio.run(scenario())
    with isolation_db.connection(), isolation_db.unit_of_work(write=True):
        outside = _commit_setting()  # any other transaction (the configurator's, say) keeps the server's setting
    if isolation_db.is_postgres():
        assert relaxed == "off" and durable == "on" and outside == "on"
        assert together[0] == "off" and isinstance(together[1], ValueError)
    else:  # SQLite: the option changes nothing (its own trade-off is synchronous=NORMAL in WAL mode)
        assert relaxed == durable == outside == together[0] == "sqlite"


def test_a_sender_without_user_id_speaks_in_its_group():
    data = legacy_message("x", message_id="L-g", group_id="g-only").to_dict()
    data["message_info"]["user_info"] = {"platform": "qq", "user_nickname": "anon"}
    inbound = parse_legacy_message(data, 100)
    assert (inbound.user_id, inbound.group_id, inbound.nickname) == (None, "g-only", "anon")


def test_legacy_message_info_must_be_an_object():
    data = legacy_message("x").to_dict()
    data["message_info"] = "nope"
    with pytest.raises(BadInput, match="message_info is required") as err:
        parse_legacy_message(data, 100)
    assert err.value.code == "missing_field"


def test_encoded_size_refuses_what_is_not_json():
    with pytest.raises(TypeError):
        encoded_size({"o": object()})


def test_persona_prompt_and_explicit_openai_settings():
    persona = Persona(personality="p", plan_style="plans ahead", states=["sleepy", "busy"])
    text = persona_text(persona, "Mai")
    assert "Plan style: plans ahead" in text and "Possible states: sleepy, busy" in text
    own = LlmSettings(provider="openai", base_url="http://own/v1/", model="own-model")
    config = resolve_provider_config(own, None, default_base_url="http://global/v1", default_model="g")
    assert (config.kind, config.base_url, config.model) == ("openai", "http://own/v1", "own-model")


def test_offline_responder_without_persona_and_with_other_memories():
    provider = OfflineProvider()
    request = LlmRequest(messages=[], agent_name="Mai", user_text="remember that I like tea", memories=["likes tea"])
    text = provider.respond(request)
    assert text == "[offline] Mai heard: \u201cremember that I like tea\u201d. I remember 1 thing(s) about this chat."
    assert rule_memory("please remember that I like tea.", "u9") == "u9 asked to remember: I like tea"
    assert asyncio.run(provider.extract_memory(request, text)) == "the user asked to remember: I like tea"
    assert asyncio.run(provider.aclose()) is None


def test_registry_targets_skip_foreign_or_vanished_connections():
    registry = ConnectionRegistry()
    conn = Connection("s1", "c1", "api", "k1", "t1", "a1", "qq", "secret")
    registry.add(conn)
    registry.subscribe(conn, ("t1", "a1", "qq", "cs_1"))
    registry.by_stream[("t1", "a1", "qq", "cs_1")].add("vanished-sid")
    assert registry.targets(("t1", "a1", "qq", "cs_1")) == [conn]


def test_a_failing_commit_fails_the_whole_batch_and_the_store_recovers(configured_db, caplog):
    """SQLite checks deferred foreign keys at COMMIT: the commit itself fails, after every savepoint."""
    if isolation_db.is_postgres():
        pytest.skip("needs SQLite's deferred foreign keys to make a COMMIT fail")
    ta = make_tenant()
    ctx = IsolationContext(ta.tenant_id, ta.agent_id, "qq")

    def orphan_stream():
        isolation_db.database.obj.execute_sql("PRAGMA defer_foreign_keys = ON")
        now = utcnow()
        ChatStream.insert(
            tenant_id=ta.tenant_id,
            id="cs_orphan",
            agent_id="agt_" + "Q" * 16,
            platform="qq",
            kind="private",
            user_id="orphan",
            created_at=now,
            last_active_at=now,
        ).execute()

    def innocent():
        return Scoped(ctx).chat_streams.get_or_create(user_id="innocent")["id"]

    started, release = threading.Event(), threading.Event()

    def hold():  # keeps the worker busy so that the next two jobs share one batch
        started.set()
        release.wait(10)

    async def scenario():
        store = Store(workers=1, batch_max=64, checkpoint_seconds=0)
        store.start()
        try:
            held = store.run(hold)
            await asyncio.to_thread(started.wait, 10)
            jobs = [store.run(orphan_stream), store.run(innocent)]
            release.set()
            await held
            failed = await asyncio.gather(*jobs, return_exceptions=True)
            after = await store.run(innocent)
            return failed, after
        finally:
            await asyncio.to_thread(store.stop)

    with caplog.at_level(logging.ERROR, "replier.store"):
        (orphan, first_innocent), after = asyncio.run(scenario())
    assert "FOREIGN KEY" in str(orphan) and "FOREIGN KEY" in str(first_innocent)
    assert "database batch of 2 jobs failed" in caplog.text
    assert after.startswith("cs_")  # a fresh connection serves the next batch
    assert [s["user_id"] for s in Scoped(ctx).chat_streams.list()] == ["innocent"]
