"""Database outages against a real `python -m replier`: retryable chat errors in both protocols, the
connection kept, connects refused with a retryable reason, an honest /health, and recovery.

The replier runs on a database of this module's own (the outage must not touch the suite's):
SQLite is locked by another process, PostgreSQL refuses and drops every connection for a while, and
a full disk is a small tmpfs under a SQLite file, filled up.
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
from testsupport.faults import TmpfsUnavailable, database_outage, fill_disk, sqlite_on_a_small_disk

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


def test_a_full_disk_gives_retryable_storage_full_and_the_message_is_answered_once_space_is_back(provisioned, tmp_path):
    """The disk under the SQLite file fills up: a chat message gets `storage_full` (retryable), the
    connection stays, /health names the disk; once space is back the same message is answered."""
    if DB_KIND != "sqlite":
        pytest.skip("a full disk is injected under the SQLite file (the PostgreSQL server's disk is not ours)")
    try:
        with sqlite_on_a_small_disk(tmp_path / "disk") as (url, disk):
            isolation_db.configure(url)
            try:
                _full_disk_scenario(url, disk)
            finally:
                isolation_db.close_database()
                isolation_db.configure(provisioned.url, app_role=provisioned.app_role)
    except TmpfsUnavailable as exc:
        pytest.skip(f"no tmpfs for the full-disk test: {exc}")


def _full_disk_scenario(url: str, disk) -> None:
    ta = make_tenant()
    server = ReplierProcess(url, None, HEALTH_MIN_FREE_MB="1", **FAST).start()
    filler = None

    async def scenario() -> None:
        nonlocal filler
        maim = await MaimClient(server.url, ta.secret).start()
        try:
            await maim.send(api_message("while there is room", message_id="d-0", user_id="disk-user"))
            assert (await maim.reply()).message_info.message_id == "mt-reply:d-0"
            filler = fill_disk(disk)
            await maim.send(api_message("on a full disk", message_id="d-1", user_id="disk-user"))
            error = await maim.error(timeout=20)
            assert error["code"] == "storage_full" and error["retryable"] is True, error
            assert error["message_id"] == "d-1"
            health = httpx.get(f"{server.http}/health", timeout=10)
            assert health.status_code == 503
            assert health.json()["checks"]["disk"].startswith("error: storage_full"), health.json()
            assert maim.client.is_connected()
            filler.unlink()
            filler = None
            await maim.send(api_message("on a full disk", message_id="d-1", user_id="disk-user"))
            assert (await maim.reply(timeout=20)).message_info.message_id == "mt-reply:d-1"
            assert httpx.get(f"{server.http}/health", timeout=10).status_code == 200
        finally:
            await maim.stop()

    try:
        run(scenario())
    finally:
        if filler is not None:
            filler.unlink()
        server.stop()
    log = server.logs()
    assert "processing message" not in log and "internal_error" not in log, log
    assert "storage_full" in log
    assert "cannot rollback" not in log, log  # SQLite ended the transaction itself: no ROLLBACK on top
    ids = [m["message_id"] for m in ta.history("qq", user_id="disk-user")]
    assert ids == ["d-0", "mt-reply:d-0", "d-1", "mt-reply:d-1"]
