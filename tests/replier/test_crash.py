"""kill -9 mid-conversation: clients reconnect to the restarted replier, history is intact and
replayed message ids are not stored twice. A reply sent just before the kill may be delivered once
more when a client reconnects (its delivery was not recorded yet; docs/RELIABILITY.md): such a
redelivery is marked and skipped here."""

from __future__ import annotations

import asyncio

from replier_support import MaimClient, ReplierProcess, api_message, make_tenant, run, wait_for
from test_compat import _envelope, next_of

from isolation import Scoped


def _redelivered(meta: dict) -> bool:
    return bool(meta.get("redelivered"))


async def _next_reply(maim: MaimClient, redelivered: list[str]):
    """The next reply that is not a redelivery (those are collected in `redelivered`)."""
    while True:
        reply = await maim.reply()
        if not _redelivered(reply.message_info.additional_config["maitenant"]):
            return reply
        redelivered.append(reply.message_info.message_id)


def test_kill9_restart_reconnect_and_replay(provisioned, configured_db):
    import socketio

    ta = make_tenant()
    server = ReplierProcess(provisioned.url, provisioned.app_role).start()
    # A message stored just before a crash, never answered: a replay must answer it now.
    Scoped(ta.stream_ctx("qq", user_id="crash-user")).chat_streams.get_or_create(user_id="crash-user")
    Scoped(ta.stream_ctx("qq", user_id="crash-user")).messages.add(
        message_id="orphan-1", direction="in", text="stored, unanswered", segments={"type": "text", "data": "x"}
    )

    async def scenario():
        maim = await MaimClient(server.url, ta.secret).start()
        raw_inbox: asyncio.Queue = asyncio.Queue()
        raw = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=0.5)

        @raw.on("message")
        async def on_message(data):
            await raw_inbox.put(data)

        await raw.connect(
            server.http,
            socketio_path="ws",
            transports=["websocket"],
            headers={"x-apikey": ta.secret, "x-platform": "qq"},
        )
        try:
            for i in (1, 2):
                await maim.send(api_message(f"message {i}", message_id=f"c-{i}", user_id="crash-user"))
                await maim.reply()
            server.kill9()
            await wait_for(lambda: not maim.client.is_connected() and not raw.connected)
            server.start()
            await wait_for(lambda: maim.client.is_connected(), timeout=20)
            await wait_for(lambda: raw.connected, timeout=20)
            # maim client replays c-2 (a new envelope, same message id): the stored reply comes back.
            await maim.send(api_message("message 2", message_id="c-2", user_id="crash-user"))
            redelivered: list[str] = []
            replay = await _next_reply(maim, redelivered)
            assert replay.message_info.message_id == "mt-reply:c-2"
            assert replay.message_info.additional_config["maitenant"]["replayed"] is True
            await maim.send(api_message("message 3", message_id="c-3", user_id="crash-user"))
            assert (await _next_reply(maim, redelivered)).message_info.message_id == "mt-reply:c-3"
            # The raw python-socketio client reconnected too and replays the orphan.
            payload = api_message("stored, unanswered", message_id="orphan-1", user_id="crash-user").to_dict()
            await raw.emit("message", _envelope("o-1", payload))
            orphan = await next_of(raw_inbox, "sys_std")
            while _redelivered(orphan["meta"].get("maitenant", {})):
                redelivered.append(orphan["payload"]["message_info"]["message_id"])
                orphan = await next_of(raw_inbox, "sys_std")
            assert orphan["payload"]["message_info"]["message_id"] == "mt-reply:orphan-1"
            # At most one redelivery of each reply, to one of the two connections.
            assert len(redelivered) == len(set(redelivered)) and set(redelivered) <= {"mt-reply:c-1", "mt-reply:c-2"}
        finally:
            await raw.disconnect()
            await maim.stop()

    try:
        run(scenario())
    finally:
        server.stop()
    ids = [m["message_id"] for m in ta.history("qq", user_id="crash-user")]
    assert ids == ["orphan-1", "c-1", "mt-reply:c-1", "c-2", "mt-reply:c-2", "c-3", "mt-reply:c-3", "mt-reply:orphan-1"]


def test_refuses_to_start_on_an_unmigrated_database(tmp_path):
    server = ReplierProcess(f"sqlite:///{tmp_path}/empty.db", None)
    try:
        server.start(timeout=15)
    except RuntimeError as exc:
        assert "exited with 2" in str(exc)
        assert "refusing to start" in str(exc) and "db-upgrade" in str(exc)
    else:
        server.stop()
        raise AssertionError("the replier started on an empty database")
