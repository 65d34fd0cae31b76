"""Database outages against a real `python -m replier`: retryable chat errors in both protocols, the
connection kept, connects refused with a retryable reason, an honest /health, and recovery.

The replier runs on a database of this module's own (the outage must not touch the suite's):
SQLite is locked by another process, PostgreSQL refuses and drops every connection for a while.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import httpx
import pytest
from maim_message import RouteConfig, Router, TargetConfig
from replier_support import (
    MaimClient,
    ReplierProcess,
    api_message,
    legacy_message,
    make_tenant,
    run,
    socketio_connect,
    wait_for,
)

from isolation import db as isolation_db
from isolation.faults import drop_idle_connections
from testsupport.databases import ProvisionedDatabase, leg_database
from testsupport.faults import database_outage

DB_KIND = os.environ.get("MAITENANT_TEST_DB", "sqlite")
FAST = {"SQLITE_BUSY_TIMEOUT_MS": "300", "HEALTH_CACHE_SECONDS": "0", "HEALTH_WRITE_TIMEOUT_MS": "200"}


@pytest.fixture(scope="module")
def own_db(provisioned) -> Iterator[ProvisionedDatabase]:
    """A database of this module's own, also the test process's (tenants are made in it)."""
    with leg_database(DB_KIND, in_ci=os.environ.get("CI", "").lower() == "true") as database:
        isolation_db.configure(database.url, app_role=database.app_role)
        try:
            yield database
        finally:
            isolation_db.configure(provisioned.url, app_role=provisioned.app_role)


def test_outage_gives_retryable_chat_errors_keeps_connections_and_recovers(own_db):
    ta = make_tenant()
    _, other_key = ta.new_key()
    server = ReplierProcess(own_db.url, own_db.app_role, **FAST).start()
    legacy_inbox: asyncio.Queue = asyncio.Queue()

    async def scenario() -> None:
        maim = await MaimClient(server.url, ta.secret).start()
        router = Router(RouteConfig({"wechat": TargetConfig(url=server.url, token=ta.secret)}))

        async def on_legacy(message: dict) -> None:
            await legacy_inbox.put(message)

        router.register_class_handler(on_legacy)
        router_task = asyncio.create_task(router.run())
        try:
            await wait_for(lambda: router.check_connection("wechat"))
            with database_outage(own_db):
                await maim.send(api_message("during the outage", message_id="f-1", user_id="fault-user"))
                error = await maim.error(timeout=20)
                assert error["code"] == "database_unavailable" and error["retryable"] is True, error
                assert error["message_id"] == "f-1"
                await router.send_message(legacy_message("legacy during", message_id="L-f1", platform="wechat"))
                legacy_error = await asyncio.wait_for(legacy_inbox.get(), 20)
                info = legacy_error["message_info"]["additional_config"]["maitenant"]["error"]
                assert info["code"] == "database_unavailable" and info["retryable"] is True, info
                assert info["message_id"] == "L-f1"
                health = httpx.get(f"{server.http}/health", timeout=10)
                assert health.status_code == 503
                checks = health.json()["checks"]
                failing = "write" if own_db.kind == "sqlite" else "database"
                assert checks[failing].startswith("error: database_unavailable"), checks
                if own_db.kind == "postgresql":  # SQLite still reads while locked: lookups work
                    refusal = await socketio_connect(server.url, {"x-apikey": other_key})
                    assert refusal is not None and "database_unavailable" in refusal["message"], refusal
                    assert "retryable" in refusal["message"]
            # Both connections stayed open through the outage; sending again is answered.
            assert maim.client.is_connected() and router.check_connection("wechat")
            await maim.send(api_message("during the outage", message_id="f-1", user_id="fault-user"))
            assert (await maim.reply(timeout=20)).message_info.message_id == "mt-reply:f-1"
            await router.send_message(legacy_message("legacy during", message_id="L-f1", platform="wechat"))
            legacy_reply = await asyncio.wait_for(legacy_inbox.get(), 20)
            assert legacy_reply["message_info"]["message_id"] == "mt-reply:L-f1"
            assert httpx.get(f"{server.http}/health", timeout=10).status_code == 200
        finally:
            await router.stop()
            router_task.cancel()
            await asyncio.gather(router_task, return_exceptions=True)
            await maim.stop()

    try:
        run(scenario())
    finally:
        server.stop()
        isolation_db.close_connection()  # the outage terminated this process's connections too
        drop_idle_connections()
    log = server.logs()
    assert "processing message" not in log and "internal_error" not in log, log
    assert log.count("database_unavailable: ") <= 3, log  # chat messages, batch, lookups: a line per kind
    ids = [m["message_id"] for m in ta.history("qq", user_id="fault-user")]
    assert ids == ["f-1", "mt-reply:f-1"]
