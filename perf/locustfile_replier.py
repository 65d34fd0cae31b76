"""Locust load test of the replier over the maim_message API-Server protocol (Socket.IO, path /ws).

    python -m perf.seed --tenants 10 --agents 5 --database-url URL         # once, against the same database
    locust -f perf/locustfile_replier.py --host http://127.0.0.1:8095 \
        --headless -u 50 -r 25 -t 30s --csv reports/load/replier --seed-csv perf/seed.csv

Each simulated user takes its own seed row (perf/load_common.py) and connects with that row's API key
(`x-apikey`) and platform (`x-platform`), then chats in that row's group: it sends one `sys_std`
envelope (an `APIMessageBase` built with maim_message's classes), waits for the replier's `sys_std`
reply to *that* message (the reply's `message_info.message_id` is `mt-reply:<our message id>`), and
fires one locust request event `socketio / reply` with the time from send to reply. `sys_ack`
envelopes are never counted as replies. A reply later than `--reply-timeout`, a `custom_error`
envelope or a dropped connection is a failure. One message is in flight per user; a user whose
connection died reconnects (event `socketio / connect`) before its next message.

Two client implementations (`--sio-client`):

* `raw` (default): websocket-client speaking Engine.IO v4 / Socket.IO v5 frames itself, with one reader
  greenlet per connection that answers pings, acks replies and hands them to the user through a
  gevent queue. Cheapest per message, so the 2-core machine's CPU goes to the server.
* `socketio`: python-socketio's sync `socketio.Client` (websocket transport, reconnection off: the user
  reconnects itself), which gevent's monkey patching turns cooperative.
Both were run under locust's gevent; see docs/PERFORMANCE.md for what each costs.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
import uuid

import gevent
import maim_message  # noqa: F401  (installs an INFO handler that logs API keys; silenced below)
from gevent.queue import Empty, Queue
from locust import User, task
from maim_message.message import APIMessageBase, BaseMessageInfo, GroupInfo, MessageDim, Seg, SenderInfo, UserInfo

from perf.load_common import options, take_row, think_time

logging.getLogger("maim_message").setLevel(logging.WARNING)

REPLY_PREFIX = "mt-reply:"
LINES = [
    "hello there",
    "what do you think about the weather today?",
    "can you recommend a good book?",
    "haha that is funny",
    "I had noodles for lunch",
    "anyone up for a game tonight?",
    "tell me something interesting",
    "good morning everyone",
]
_user_ids = itertools.count(1)


class ReplyTimeout(Exception):
    pass


class ServerError(Exception):
    pass


class ConnectionLost(Exception):
    pass


class Refused(Exception):
    pass


def envelope(api_key: str, platform: str, group_id: str, user_id: str, message_id: str, text: str) -> dict:
    now = time.time()
    message = APIMessageBase(
        message_info=BaseMessageInfo(
            platform=platform,
            message_id=message_id,
            time=now,
            sender_info=SenderInfo(
                group_info=GroupInfo(platform, group_id, f"group {group_id}"),
                user_info=UserInfo(platform, user_id, user_id),
            ),
        ),
        message_segment=Seg(type="text", data=text),
        message_dim=MessageDim(api_key=api_key, platform=platform),
    )
    return {
        "ver": 1,
        "msg_id": f"msg_{uuid.uuid4().hex}",
        "type": "sys_std",
        "meta": {"sender_user": user_id, "platform": platform, "timestamp": now},
        "payload": message.to_dict(),
    }


def ack(msg_id: str) -> dict:
    now = time.time()
    return {
        "ver": 1,
        "msg_id": f"ack_{uuid.uuid4().hex}",
        "type": "sys_ack",
        "meta": {"acked_msg_id": msg_id, "timestamp": now},
        "payload": {"status": "received", "client_timestamp": now},
    }


class _Connection:
    """What the user needs from a connection; inbound `sys_std`/`custom_error` land in `inbox`."""

    def __init__(self, ack_replies: bool) -> None:
        self.inbox: Queue = Queue()
        self.ack_replies = ack_replies
        self.alive = False

    def dispatch(self, data, size: int) -> None:
        """Called for every inbound "message" event (from the reader greenlet)."""
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "sys_std":
            if self.ack_replies and data.get("msg_id"):
                try:
                    self.emit(ack(data["msg_id"]))
                except Exception:  # a dying connection: the reader reports it
                    logging.debug("ack failed", exc_info=True)
            self.inbox.put(("reply", data, size))
        elif isinstance(kind, str) and kind.startswith("custom_"):
            self.inbox.put(("error", data, size))
        # sys_ack and anything else: not a reply

    def lost(self, reason: str) -> None:
        if self.alive:
            self.alive = False
            self.inbox.put(("closed", reason, 0))


class RawConnection(_Connection):
    """Engine.IO v4 / Socket.IO v5 over websocket-client, one reader greenlet."""

    def __init__(self, host: str, headers: dict[str, str], ack_replies: bool, timeout: float) -> None:
        import websocket

        super().__init__(ack_replies)
        url = host.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self.ws = websocket.create_connection(
            f"{url}/ws/?EIO=4&transport=websocket",
            header=[f"{k}: {v}" for k, v in headers.items()],
            timeout=timeout,
            enable_multithread=True,
        )
        try:
            opened = self.ws.recv()
            if not opened.startswith("0"):
                raise ConnectionLost(f"unexpected Engine.IO open packet {opened[:60]!r}")
            self.ws.send("40")
            while True:
                packet = self.ws.recv()
                if packet.startswith("40"):
                    break
                if packet.startswith("44"):
                    raise Refused(packet[2:200])
                if packet == "2":
                    self.ws.send("3")
        except BaseException:
            self.ws.close()
            raise
        self.ws.settimeout(None)
        self.alive = True
        self.reader = gevent.spawn(self._read)

    def emit(self, data: dict) -> None:
        self.ws.send('42["message",' + json.dumps(data, separators=(",", ":")) + "]")

    def _read(self) -> None:
        reason = "closed by server"
        try:
            while True:
                packet = self.ws.recv()
                if not packet:
                    break
                if packet == "2":
                    self.ws.send("3")
                elif packet.startswith("42"):
                    event, *args = json.loads(packet[2:])
                    if event == "message" and args:
                        self.dispatch(args[0], len(packet))
                elif packet.startswith("41") or packet == "1":
                    reason = "disconnected by server"
                    break
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.lost(reason)

    def close(self) -> None:
        self.alive = False
        try:
            self.ws.send("41")
        except Exception:  # already gone
            logging.debug("close failed", exc_info=True)
        self.ws.close()
        self.reader.kill(block=False)


class SocketIOConnection(_Connection):
    """python-socketio's sync client (websocket transport only; no automatic reconnection)."""

    def __init__(self, host: str, headers: dict[str, str], ack_replies: bool, timeout: float) -> None:
        import socketio

        super().__init__(ack_replies)
        self.sio = socketio.Client(reconnection=False, handle_sigint=False)
        self.sio.on("message", lambda data: self.dispatch(data, len(json.dumps(data))))
        self.sio.on("disconnect", lambda *reason: self.lost(f"disconnected: {reason}"))
        try:
            self.sio.connect(host, headers=headers, transports=["websocket"], socketio_path="ws", wait_timeout=timeout)
        except socketio.exceptions.ConnectionError as exc:
            raise Refused(str(exc)) from None
        self.alive = True

    def emit(self, data: dict) -> None:
        self.sio.emit("message", data)

    def close(self) -> None:
        self.alive = False
        self.sio.disconnect()


class ReplierUser(User):
    """One maim_message client chatting in its own (tenant, agent, platform, group)."""

    def wait_time(self) -> float:
        return think_time(self.environment, 0.2, 1.0)

    def on_start(self) -> None:
        parsed = options(self.environment)
        self.row = take_row(self.environment)
        self.user_id = f"load-user-{next(_user_ids)}"
        self.timeout = parsed.reply_timeout
        self.kind = RawConnection if parsed.sio_client == "raw" else SocketIOConnection
        self.ack_replies = not parsed.no_ack
        self.sent = 0
        self.conn: _Connection | None = None

    def on_stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _fire(self, name: str, started: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="socketio",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={"tenant_id": self.row["tenant_id"], "agent_id": self.row["agent_id"]},
        )

    def _connect(self) -> bool:
        if self.conn is not None and self.conn.alive:
            return True
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        started = time.perf_counter()
        headers = {"x-apikey": self.row["api_key"], "x-platform": self.row["platform"]}
        try:
            self.conn = self.kind(self.host, headers, self.ack_replies, self.timeout)
        except Exception as exc:
            self._fire("connect", started, exception=exc)
            return False
        self._fire("connect", started)
        return True

    @task
    def chat(self) -> None:
        if not self._connect():
            return
        conn = self.conn
        self.sent += 1
        message_id = f"{self.user_id}-{self.sent}-{uuid.uuid4().hex[:8]}"
        expected = REPLY_PREFIX + message_id
        data = envelope(
            self.row["api_key"], self.row["platform"], self.row["group_id"], self.user_id, message_id,
            random.choice(LINES),
        )  # fmt: skip
        started = time.perf_counter()
        try:
            conn.emit(data)
        except Exception as exc:
            conn.lost(f"send failed: {exc}")
            self._fire("reply", started, exception=ConnectionLost(f"send failed: {type(exc).__name__}: {exc}"))
            return
        deadline = started + self.timeout
        while True:
            remaining = deadline - time.perf_counter()
            try:
                kind, payload, size = conn.inbox.get(timeout=max(remaining, 0))
            except Empty:
                self._fire("reply", started, exception=ReplyTimeout(f"no reply within {self.timeout:g} s"))
                return
            if kind == "closed":
                self._fire("reply", started, exception=ConnectionLost(payload))
                return
            body = payload.get("payload") if isinstance(payload.get("payload"), dict) else {}
            if kind == "error":
                if body.get("message_id") in (None, message_id):
                    error = ServerError(f"{body.get('code')}: {str(body.get('message'))[:120]}")
                    self._fire("reply", started, size, exception=error)
                    return
                continue
            reply_id = str((body.get("message_info") or {}).get("message_id", ""))
            if reply_id == expected or not reply_id.startswith(REPLY_PREFIX):
                self._fire("reply", started, size)
                return
            # a late reply to an earlier (timed-out) message, or another user's in the same chat: skip
