"""Unit tests of the replier's pieces that need no server: protocol, providers, store, registry."""

from __future__ import annotations

import asyncio

import pytest
from replier_support import api_message, legacy_message, make_tenant

from isolation import IsolationContext, Scoped
from isolation.agent_config import LlmSettings, Persona
from replier import db_jobs
from replier.connections import Connection, ConnectionRegistry
from replier.llm import ChatMessage, LlmRequest, OfflineProvider, build_prompt, resolve_provider_config
from replier.llm.offline import rule_memory
from replier.memory import worth_storing
from replier.protocol import (
    BadInput,
    build_ack,
    build_api_reply,
    parse_api_message,
    parse_envelope,
    parse_legacy_message,
)
from replier.store import Store


def test_api_envelope_round_trip_uses_maim_classes():
    data = {
        "ver": 1,
        "msg_id": "e1",
        "type": "sys_std",
        "payload": api_message("hi", message_id="1", group_id="g").to_dict(),
    }
    inbound = parse_api_message(parse_envelope(data), data, 16384)
    assert (inbound.message_id, inbound.group_id, inbound.user_id, inbound.text) == ("1", "g", "user-1", "hi")
    reply = build_api_reply(inbound, reply_id="r1", text="yo", api_key="k", agent_name="a", metadata={"offline": True})
    from maim_message.message import APIMessageBase

    parsed = APIMessageBase.from_dict(reply["payload"])
    assert parsed.message_info.receiver_info.group_info.group_id == "g"
    assert parsed.message_dim.api_key == "k"
    ack = build_ack("e1", "conn_x")
    assert ack["type"] == "sys_ack" and ack["meta"]["acked_msg_id"] == "e1"


def test_legacy_parse_accepts_top_level_user_info():
    inbound = parse_legacy_message(legacy_message("hey", message_id="7", user_id="u").to_dict(), 100)
    assert (inbound.protocol, inbound.user_id, inbound.text) == ("legacy", "u", "hey")
    with pytest.raises(BadInput) as err:
        parse_legacy_message({"message_info": {}, "message_segment": {"type": "text", "data": "x"}}, 100)
    assert err.value.code == "missing_field"


def test_offline_responder_is_deterministic_labelled_and_persona_aware():
    persona = Persona(personality="calm", reply_style="brief", interests=["chess", "tea"])
    request = LlmRequest(
        messages=[], persona=persona, agent_name="Mai", user_text="hello", memories=["Bob's name is Bob"]
    )
    one = asyncio.run(OfflineProvider().complete(request))
    two = asyncio.run(OfflineProvider().complete(request))
    assert one == two and one.offline and one.provider == "offline"
    assert one.text.startswith("[offline] Bob, Mai heard")
    assert "calm" in one.text and "brief" in one.text
    assert rule_memory("Hi, my name is Carol!", "u1") == "u1's name is Carol"
    assert rule_memory("nothing here") is None
    assert worth_storing("u1's name is Carol", ["U1'S NAME IS CAROL"]) is None


def test_provider_resolution_defaults_and_offline_fallback():
    default = LlmSettings()
    assert resolve_provider_config(default, None).kind == "offline"
    config = resolve_provider_config(
        default,
        None,
        default_provider="openai",
        default_base_url="http://h/v1/",
        default_model="m",
        default_api_key="k",
    )
    assert (config.kind, config.base_url, config.model, config.api_key) == ("openai", "http://h/v1", "m", "k")
    own = LlmSettings(provider="openai", base_url="http://agent/v1", model="x")
    assert resolve_provider_config(own, "agent-key", default_api_key="global").api_key == "agent-key"
    assert resolve_provider_config(LlmSettings(provider="openai"), None).kind == "offline"  # nothing usable
    prompt = build_prompt(
        persona=Persona(),
        agent_name="A",
        memories=["m1"],
        history=[("in", "a", "u"), ("out", "b", None)],
        user_text="c",
    )
    assert [m.role for m in prompt] == ["system", "user", "assistant", "user"]
    assert "m1" in prompt[0].content and prompt[1] == ChatMessage("user", "u: a")


def test_registry_only_joins_own_tenant_streams():
    registry = ConnectionRegistry()
    conn = Connection("sid1", "conn_1", "api", "key_1", "ten_a", "agt_a", "qq", "secret")
    registry.add(conn)
    registry.subscribe(conn, ("ten_a", "agt_a", "qq", "cs_1"))
    with pytest.raises(ValueError):
        registry.subscribe(conn, ("ten_b", "agt_a", "qq", "cs_1"))
    assert registry.targets(("ten_a", "agt_a", "qq", "cs_1")) == [conn]
    assert registry.targets(("ten_b", "agt_a", "qq", "cs_1")) == []
    registry.remove("sid1")
    assert registry.by_stream == {}


def test_store_batches_jobs_and_isolates_a_failing_one(configured_db):
    ta = make_tenant()
    ctx = IsolationContext(ta.tenant_id, ta.agent_id, "qq")

    def add_stream(user_id):
        return Scoped(ctx).chat_streams.get_or_create(user_id=user_id)["id"]

    def boom():
        Scoped(ctx).chat_streams.get_or_create(user_id="rolled-back")
        raise RuntimeError("job failed")

    async def scenario():
        store = Store(workers=1, batch_max=64)
        store.start()
        try:
            futures = [store.run(add_stream, "u1"), store.run(boom), store.run(add_stream, user_id="u2")]
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await asyncio.to_thread(store.stop)

    first, failed, third = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError)
    assert first.startswith("cs_") and third.startswith("cs_")
    users = sorted(s["user_id"] for s in Scoped(ctx).chat_streams.list())
    assert users == ["u1", "u2"]  # the failing job's write was rolled back alone


def test_agent_view_reads_config_through_pydantic(configured_db):
    ta = make_tenant(persona={"personality": "dry"}, config={"chat": {"max_context_size": 3}}, llm_key="sk-1")
    view = db_jobs.load_agent(ta.ctx)
    assert view.persona.personality == "dry" and view.config.chat.max_context_size == 3
    assert view.llm_api_key == "sk-1" and view.llm.provider == "default"
