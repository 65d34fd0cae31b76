"""Stopping a real `python -m replier` while a model call is slow: the reply is delivered before the
connection closes, and a second signal still stops the store and flushes key use."""

from __future__ import annotations

import re
import signal
import time

from replier_support import MaimClient, ReplierProcess, api_message, make_tenant, run, wait_for

from isolation import IsolationContext, Scoped


def _slow_tenant(fake_llm):
    return make_tenant(llm={"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-sleep-12"})


def _server(provisioned, **env: str) -> ReplierProcess:
    server = ReplierProcess(provisioned.url, provisioned.app_role, USAGE_FLUSH_SECONDS="300", **env)
    server.env.pop("SHUTDOWN_GRACE_SECONDS")  # the default: derived from the LLM timeout and retries
    return server.start()


def _usage(ta) -> int:
    keys = Scoped(IsolationContext(ta.tenant_id)).api_keys.list(ta.agent_id)
    return next(k for k in keys if k["id"] == ta.key_id)["usage_count"]


def test_sigterm_during_a_slow_llm_call_delivers_the_reply_before_closing(provisioned, configured_db, fake_llm):
    ta = _slow_tenant(fake_llm)
    # One call of up to 20 s, no retry: the derived grace is 25 s, more than the 12 s the model takes.
    server = _server(provisioned, LLM_TIMEOUT_SECONDS="20", LLM_MAX_RETRIES="0")
    asked = len(fake_llm.requests)

    async def scenario():
        maim = await MaimClient(server.url, ta.secret).start()
        try:
            await maim.send(api_message("answer me slowly", message_id="slow-1", user_id="sigterm-user"))
            await wait_for(lambda: len(fake_llm.requests) > asked)
            server.process.send_signal(signal.SIGTERM)
            reply = await maim.reply(timeout=30)
            assert reply.message_info.message_id == "mt-reply:slow-1"
            assert reply.message_segment.data == "LLM reply to: sigterm-user: answer me slowly"
        finally:
            await maim.stop()

    try:
        run(scenario())
        server.process.wait(30)
    finally:
        server.stop()
    log = server.logs()
    assert "replier stopped" in log, log
    assert "client has been closed" not in log and "still in flight" not in log, log
    assert _usage(ta) == 1  # flushed at the stop, not by the (300 s) timer
    ids = [m["message_id"] for m in ta.history("qq", user_id="sigterm-user")]
    assert ids == ["slow-1", "mt-reply:slow-1"]


def test_sigterm_then_sigint_still_stops_the_store_and_flushes_usage(provisioned, configured_db, fake_llm):
    ta = _slow_tenant(fake_llm)
    server = _server(provisioned, SHUTDOWN_FORCE_SECONDS="1")
    asked = len(fake_llm.requests)

    async def scenario():
        maim = await MaimClient(server.url, ta.secret).start()
        try:
            await maim.send(api_message("never mind", message_id="hurry-1", user_id="sigint-user"))
            await wait_for(lambda: len(fake_llm.requests) > asked)
        finally:
            await maim.stop()

    run(scenario())
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(20)
    finally:
        server.stop()
    log = server.logs()
    assert "second stop signal (SIGINT)" in log, log
    assert "replier stopped" in log, log
    assert "waiting at most 1.0s more for in-flight replies" in log, log  # not the 95.75 s of the grace
    waited = re.search(r"1 replies still in flight after ([0-9.]+)s", log)
    assert waited is not None and float(waited.group(1)) < 10, log  # the time it waited, not the grace
    assert _usage(ta) == 1  # the usage flush ran although the shutdown was hurried
    assert [m["message_id"] for m in ta.history("qq", user_id="sigint-user")] == ["hurry-1"]
