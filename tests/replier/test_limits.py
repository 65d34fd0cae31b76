"""Per-tenant limits on a live replier subprocess (replier/limits.py), with maim_message's own clients.

Each limit is reached exactly at its number (N allowed, N+1 refused), the error codes are checked in
both protocols, nothing is stored beyond a rate limit, the counters reset at their (short, for the
test) window, and an operator's override or suspension reaches the running replier within 5 s.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest
from maim_message import RouteConfig, Router, TargetConfig
from replier_support import MaimClient, ReplierProcess, api_message, legacy_message, make_tenant, run, wait_for

from isolation import Scoped
from isolation.context import IsolationContext
from replier.limits import QUOTA_REPLY

WINDOW = 3.0  # LIMIT_WINDOW_SECONDS of the replier under test
LIVE = 5.0  # an operator's change must reach a running replier within this


@pytest.fixture(scope="module")
def limited(provisioned, configured_db):
    server = ReplierProcess(
        provisioned.url,
        provisioned.app_role,
        LIMIT_WINDOW_SECONDS=str(WINDOW),
        LIMITS_REFRESH_SECONDS="0.5",
    )
    server.start()
    yield server
    server.stop()


def _set_limits(ta, **overrides) -> None:
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits(overrides)


def _set_status(ta, status: str) -> None:
    Scoped(IsolationContext(ta.tenant_id)).tenant.set_status(status)


async def _fresh_window(window: float = WINDOW) -> None:
    """Wait for the start of the next window (windows are aligned to the epoch), so a burst of a few
    messages falls in one window."""
    now = time.time()
    await asyncio.sleep(math.floor(now / window) * window + window - now + 0.05)


def _metric(server: ReplierProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=5).text
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_agent_rate_is_exact_routed_to_the_chat_stores_nothing_and_resets(limited):
    ta = make_tenant()
    _set_limits(ta, agent_messages_per_minute=3)
    throttled_before = _metric(limited, "replier_throttled_total", limit="agent_messages_per_minute")

    async def scenario():
        client = await MaimClient(limited.url, ta.secret).start()
        try:
            await _fresh_window()
            for i in range(3):
                await client.send(api_message(f"m{i}", message_id=f"ag-{i}", group_id="g1", user_id="u1"))
            replies = [await client.reply() for _ in range(3)]
            await client.send(api_message("one too many", message_id="ag-3", group_id="g1", user_id="u1"))
            error = await client.error()
            assert client.replies.empty()
            await asyncio.sleep(error["retry_after"])  # the window resets
            await client.send(api_message("next window", message_id="ag-4", group_id="g1", user_id="u1"))
            after = await client.reply()
            return replies, error, after
        finally:
            await client.stop()

    replies, error, after = run(scenario())
    assert [r.message_info.message_id for r in replies] == ["mt-reply:ag-0", "mt-reply:ag-1", "mt-reply:ag-2"]
    assert error["code"] == "rate_limited" and error["limit"] == "agent_messages_per_minute"
    assert error["message_id"] == "ag-3" and 1 <= error["retry_after"] <= WINDOW
    assert error["platform"] == "qq"  # routed to the chat it came from
    assert error["group_info"]["group_id"] == "g1" and error["user_info"]["user_id"] == "u1"
    assert after.message_info.message_id == "mt-reply:ag-4"
    stored = [m["message_id"] for m in ta.history("qq", group_id="g1") if m["direction"] == "in"]
    # nothing of the refused message (as a set: messages that arrive while the stream is busy are
    # stored at once, by whichever database worker commits first)
    assert sorted(stored) == ["ag-0", "ag-1", "ag-2", "ag-4"]
    assert _metric(limited, "replier_throttled_total", limit="agent_messages_per_minute") == throttled_before + 1
    assert "throttled: agent_messages_per_minute" in limited.logs()


def test_tenant_rate_counts_all_agents_and_legacy_clients_get_an_error_messagebase(limited):
    ta = make_tenant()
    second_agent = Scoped(IsolationContext(ta.tenant_id)).agents.create(name="second", persona={}, config={}, llm={})
    _, second_key = Scoped(IsolationContext(ta.tenant_id)).api_keys.create(second_agent["id"], name="k2")
    _set_limits(ta, messages_per_minute=2, agent_messages_per_minute=0)  # 0: the agents are unlimited
    received: list[dict] = []

    async def scenario():
        api = await MaimClient(limited.url, ta.secret).start()
        router = Router(RouteConfig({"wechat": TargetConfig(url=limited.url, token=second_key)}))

        async def handler(message: dict):
            received.append(message)

        router.register_class_handler(handler)
        task = asyncio.create_task(router.run())
        try:
            await wait_for(lambda: router.check_connection("wechat"))
            await _fresh_window()
            await api.send(api_message("first", message_id="tn-0"))
            await api.reply()
            await router.send_message(legacy_message("second", message_id="tn-1", platform="wechat", group_id="g2"))
            await wait_for(lambda: len(received) == 1)
            await router.send_message(legacy_message("third", message_id="tn-2", platform="wechat", group_id="g2"))
            await wait_for(lambda: len(received) == 2)
        finally:
            await api.stop()
            await router.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    assert received[0]["message_info"]["message_id"] == "mt-reply:tn-1"
    refused = received[1]
    error = refused["message_info"]["additional_config"]["maitenant"]["error"]
    assert error["code"] == "rate_limited" and error["limit"] == "messages_per_minute"
    assert error["message_id"] == "tn-2" and error["retry_after"] >= 1
    assert refused["message_info"]["group_info"]["group_id"] == "g2"  # routed to the chat it came from
    assert refused["message_info"]["user_info"]["user_id"] == "user-1"
    assert refused["message_segment"]["data"].startswith("[error rate_limited]")
    second = IsolationContext(ta.tenant_id, second_agent["id"], "wechat")
    stream = Scoped(second).chat_streams.stream_id_for("group", "g2")
    stored = Scoped(second.child(chat_stream_id=stream)).messages.history(50)
    assert [m["message_id"] for m in stored] == ["tn-1", "mt-reply:tn-1"]


def test_connections_limit_is_exact_and_frees_up(limited):
    ta = make_tenant()
    _set_limits(ta, connections=2)
    refused_before = _metric(limited, "replier_connections_refused_total", reason="tenant_connections")

    async def scenario():
        first = await MaimClient(limited.url, ta.secret).start()
        second = await MaimClient(limited.url, ta.secret).start()
        third = MaimClient(limited.url, ta.secret)
        try:
            reason = await third.refused()
        finally:
            await third.stop()
        await first.stop()
        fourth = await MaimClient(limited.url, ta.secret).start()  # a slot is free again
        await fourth.stop()
        await second.stop()
        return reason

    reason = run(scenario())
    assert "limit of 2 open connections" in reason
    assert _metric(limited, "replier_connections_refused_total", reason="tenant_connections") == refused_before + 1


def test_an_operator_override_reaches_the_live_replier_within_5_seconds(limited):
    ta = make_tenant()

    async def scenario():
        client = await MaimClient(limited.url, ta.secret).start()
        try:
            await client.send(api_message("before", message_id="ov-0"))
            assert (await client.reply_or_error())[0] == "reply"
            _set_limits(ta, agent_messages_per_minute=1)  # the operator's change, in the database
            changed = time.monotonic()
            # Probe: the default (600) never refuses; once the override applies, at most one more
            # message passes (the first of a new window) and the next is refused.
            for i in range(1, 200):
                kind, answer = await _answer_to(client, f"ov-{i}")
                if kind == "error":
                    return time.monotonic() - changed, answer
                await asyncio.sleep(0.1)
            raise AssertionError("the override never applied")  # pragma: no cover
        finally:
            await client.stop()

    async def _answer_to(client, message_id):
        await client.send(api_message("probe", message_id=message_id))
        return await client.reply_or_error()

    elapsed, error = run(scenario())
    assert error["code"] == "rate_limited" and error["limit"] == "agent_messages_per_minute"
    assert elapsed < LIVE, elapsed


def test_suspension_closes_and_refuses_connections_and_resume_lets_them_back(limited):
    ta = make_tenant()

    async def scenario():
        client = await MaimClient(limited.url, ta.secret).start()
        try:
            await client.send(api_message("hello", message_id="sus-0"))
            await client.reply()
            _set_status(ta, "suspended")
            started = time.monotonic()
            error = await client.error(timeout=LIVE)
            await wait_for(lambda: not client.client.is_connected(), timeout=LIVE)
            closed_after = time.monotonic() - started
        finally:
            await client.stop()
        again = MaimClient(limited.url, ta.secret)
        try:
            reason = await again.refused()
        finally:
            await again.stop()
        _set_status(ta, "active")
        # The refused connect above read the status just now; a connect reads it again once that read
        # is older than the refresh interval (0.5 s here).
        await asyncio.sleep(1.0)
        back = await MaimClient(limited.url, ta.secret).start()
        await back.send(api_message("resumed", message_id="sus-1"))
        reply = await back.reply()
        await back.stop()
        return error, closed_after, reason, reply

    error, closed_after, reason, reply = run(scenario())
    assert error["code"] == "tenant_suspended"
    assert closed_after < LIVE
    assert "suspended by the operator" in reason
    assert reply.message_info.message_id == "mt-reply:sus-1"


def _budget_agent(fake_llm):
    llm = {"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-echo", "timeout_seconds": 5}
    return make_tenant(llm=llm, llm_key="sk-budget-test")


def test_token_budget_answers_quota_exceeded_without_calling_the_model_and_survives_a_restart(
    provisioned, configured_db, fake_llm
):
    ta = _budget_agent(fake_llm)
    _set_limits(ta, tokens_per_day=18)  # fake-echo uses 18 tokens per answer: one answer fits
    server = ReplierProcess(provisioned.url, provisioned.app_role, LIMITS_REFRESH_SECONDS="0.5")
    server.start()

    async def exchange(message_id: str):
        client = await MaimClient(server.url, ta.secret).start()
        try:
            await client.send(api_message("spend", message_id=message_id))
            return await client.reply()
        finally:
            await client.stop()

    try:
        first = run(exchange("bd-0"))
        calls = len(fake_llm.requests)
        second = run(exchange("bd-1"))
        assert len(fake_llm.requests) == calls  # the model was not called
        server.stop()
        server.start()  # a restart seeds the budget from llm_usage

        async def after_restart():
            client = await MaimClient(server.url, ta.secret).start()
            try:
                await client.send(api_message("spend", message_id="bd-2"))
                reply = await client.reply()
                # The per-tenant gauges cover tenants with connections, from the next refresh on.
                await wait_for(lambda: _metric(server, "replier_tenant_budget_used_ratio", tenant=ta.tenant_id) >= 1)
                return reply
            finally:
                await client.stop()

        third = run(after_restart())
        assert len(fake_llm.requests) == calls
    finally:
        server.stop()
    assert first.message_segment.data.startswith("LLM reply to")
    for refused in (second, third):
        meta = refused.message_info.additional_config["maitenant"]
        assert refused.message_segment.data == QUOTA_REPLY
        assert meta["error"] == "quota_exceeded" and meta["outcome"] == "quota_exceeded" and meta["retry_after"] >= 1
    assert [u["outcome"] for u in Scoped(ta.ctx).llm_usage.list(limit=10)] == ["ok"]  # quota replies: no usage
    # The refused messages are in the history, unanswered: only the first exchange has a reply row.
    assert [(m["message_id"], m["direction"]) for m in ta.history("qq", user_id="user-1")] == [
        ("bd-0", "in"),
        ("mt-reply:bd-0", "out"),
        ("bd-1", "in"),
        ("bd-2", "in"),
    ]
    assert "throttled: tokens_per_day" in server.logs()


def test_token_budget_resets_at_its_window(provisioned, configured_db, fake_llm):
    ta = _budget_agent(fake_llm)
    _set_limits(ta, tokens_per_day=1)  # the first answer crosses it
    window = 3.0
    server = ReplierProcess(provisioned.url, provisioned.app_role, TOKEN_BUDGET_WINDOW_SECONDS=str(window))
    server.start()

    async def scenario():
        client = await MaimClient(server.url, ta.secret).start()
        try:
            await _fresh_window(window)
            await client.send(api_message("a", message_id="bw-0"))
            ok = await client.reply()
            await client.send(api_message("b", message_id="bw-1"))
            refused = await client.reply()
            await asyncio.sleep(refused.message_info.additional_config["maitenant"]["retry_after"])
            await client.send(api_message("c", message_id="bw-2"))
            again = await client.reply()
            return ok, refused, again
        finally:
            await client.stop()

    try:
        ok, refused, again = run(scenario())
    finally:
        server.stop()
    assert ok.message_segment.data.startswith("LLM reply to")
    assert refused.message_segment.data == QUOTA_REPLY
    assert again.message_segment.data.startswith("LLM reply to")
