"""Helpers for the replier tests: a real `python -m replier` subprocess, tenants made through the
isolation library, and maim_message clients (API-Server and legacy) that collect what they receive."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from maim_message import MessageBase as LegacyMessageBase
from maim_message.client import WebSocketClient
from maim_message.message import APIMessageBase, BaseMessageInfo, GroupInfo, MessageDim, Seg, SenderInfo, UserInfo
from maim_message.message_base import BaseMessageInfo as LegacyInfo
from maim_message.message_base import GroupInfo as LegacyGroupInfo
from maim_message.message_base import Seg as LegacySeg
from maim_message.message_base import UserInfo as LegacyUserInfo
from maim_message.ws_config import ClientConfig

from isolation import IsolationContext, Scoped, system
from isolation.crypto import encrypt_secret
from testsupport.servers import ServerProcess, free_port

logging.getLogger("maim_message").setLevel(logging.WARNING)

WAIT = 10.0


class ReplierProcess(ServerProcess):
    """`python -m replier` on a free port; logs go to a file shown when a test fails."""

    def __init__(self, database_url: str, app_role: str | None, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        settings = dict(os.environ)
        settings.update(
            DATABASE_URL=database_url,
            PORT=str(self.port),
            HOST="127.0.0.1",
            REVOCATION_CHECK_SECONDS="1",
            KEY_CACHE_SECONDS="0.5",
            LLM_MAX_RETRIES="1",
            LLM_RETRY_BACKOFF_SECONDS="0.05",
            SHUTDOWN_GRACE_SECONDS="5",
            AGENT_CACHE_SECONDS="0",
            LLM_PROVIDER="",
            # The fake LLM (tests/replier/fake_openai.py) listens on loopback, which agents' URLs may
            # only reach when the operator allows it (isolation/egress.py).
            LLM_ALLOWED_HOSTS="127.0.0.1",
            # The leg's database is shared by every test: a long grace keeps one test's server from
            # answering rows another test stored on purpose (recovery tests set their own).
            RECOVERY_GRACE_SECONDS="120",
        )
        if app_role:
            settings["DATABASE_APP_ROLE"] = app_role
        settings.update(env)
        fd, log_path = tempfile.mkstemp(prefix="replier-", suffix=".log")
        os.close(fd)
        health = f"http://127.0.0.1:{self.port}/health"
        super().__init__(
            "replier", [sys.executable, "-m", "replier"], env=settings, log_path=log_path, health_url=health
        )
        self.env: dict[str, str] = settings

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen | None:
        """The name these tests use for `process`."""
        return self.process

    def start(self, timeout: float = 20.0) -> ReplierProcess:
        """Start (or restart: the log is appended to) and wait for /health; ServerNotReady (a
        RuntimeError) with the log if it exits first or is not healthy in `timeout`."""
        super().start()
        try:
            self.wait_healthy(timeout, interval=0.05, log_chars=20000)
        except Exception:
            ServerProcess.stop(self, timeout=5)  # never leave a server behind the test cannot reach any more
            raise
        return self

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def logs(self) -> str:
        return self.log_tail(20000)


@dataclass
class TenantAgent:
    tenant_id: str
    agent_id: str
    key_id: str
    secret: str

    @property
    def ctx(self) -> IsolationContext:
        return IsolationContext(self.tenant_id, self.agent_id)

    def stream_ctx(self, platform: str, *, group_id: str | None = None, user_id: str | None = None) -> IsolationContext:
        ctx = IsolationContext(self.tenant_id, self.agent_id, platform)
        kind, peer = ("group", group_id) if group_id else ("private", user_id)
        return ctx.child(chat_stream_id=Scoped(ctx).chat_streams.stream_id_for(kind, peer))

    def history(self, platform: str, **peer) -> list[dict]:
        ctx = self.stream_ctx(platform, **peer)
        return Scoped(ctx).messages.history(200)

    def new_key(self, expires_at: datetime | None = None) -> tuple[str, str]:
        row, secret = Scoped(IsolationContext(self.tenant_id)).api_keys.create(
            self.agent_id, name=f"k-{uuid.uuid4().hex[:6]}", expires_at=expires_at
        )
        return row["id"], secret

    def revoke(self, key_id: str | None = None) -> None:
        Scoped(IsolationContext(self.tenant_id)).api_keys.revoke(key_id or self.key_id)


def make_tenant(
    name: str | None = None,
    *,
    persona: dict | None = None,
    config: dict | None = None,
    llm: dict | None = None,
    llm_key: str | None = None,
) -> TenantAgent:
    suffix = uuid.uuid4().hex[:10]
    account = system.create_account(f"u{suffix}", f"u{suffix}@example.com", "not-a-real-hash")
    tenant = system.create_tenant(name or f"tenant-{suffix}", account["id"])
    tctx = IsolationContext(tenant["id"])
    agent = Scoped(tctx).agents.create(
        name=f"agent-{suffix}",
        persona=persona or {},
        config=config or {},
        llm=llm or {},
        encrypted_api_key=encrypt_secret(llm_key) if llm_key else None,
    )
    row, secret = Scoped(tctx).api_keys.create(agent["id"], name="test key")
    return TenantAgent(tenant["id"], agent["id"], row["id"], secret)


def api_message(
    text: str | None,
    *,
    message_id: str | None = None,
    platform: str = "qq",
    user_id: str | None = "user-1",
    nickname: str | None = None,
    group_id: str | None = None,
    dim_key: str = "ignored",
    segment: Seg | None = None,
) -> APIMessageBase:
    sender = SenderInfo(
        group_info=GroupInfo(platform, group_id) if group_id else None,
        user_info=UserInfo(platform, user_id, nickname) if user_id else None,
    )
    return APIMessageBase(
        message_info=BaseMessageInfo(
            platform=platform, message_id=message_id or uuid.uuid4().hex, time=time.time(), sender_info=sender
        ),
        message_segment=segment or Seg("text", text),
        message_dim=MessageDim(api_key=dim_key, platform=platform),
    )


def legacy_message(
    text: str,
    *,
    message_id: str | None = None,
    platform: str = "qq",
    user_id: str = "user-1",
    group_id: str | None = None,
) -> LegacyMessageBase:
    info = LegacyInfo(
        platform=platform,
        message_id=message_id or uuid.uuid4().hex,
        time=time.time(),
        user_info=LegacyUserInfo(platform, user_id, "legacy user"),
        group_info=LegacyGroupInfo(platform, group_id) if group_id else None,
    )
    return LegacyMessageBase(message_info=info, message_segment=LegacySeg("text", text))


class CapturingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class MaimClient:
    """maim_message's own `WebSocketClient`, collecting replies and custom_error messages."""

    def __init__(self, url: str, api_key: str, platform: str = "qq") -> None:
        self.replies: asyncio.Queue = asyncio.Queue()
        self.errors: asyncio.Queue = asyncio.Queue()
        self.logger = logging.getLogger(f"maim-test-{uuid.uuid4().hex[:8]}")
        self.logger.propagate = False
        self.log = CapturingHandler()
        self.logger.addHandler(self.log)
        self.logger.setLevel(logging.DEBUG)

        async def on_message(message, meta):
            await self.replies.put((message, meta))

        async def on_error(payload):
            await self.errors.put(payload)

        config = ClientConfig(
            url=url, api_key=api_key, platform=platform, on_message=on_message, custom_logger=self.logger
        )
        config.register_custom_handler("custom_error", on_error)
        self.client = WebSocketClient(config)

    async def start(self, expect_connected: bool = True) -> MaimClient:
        await self.client.start()
        if expect_connected:
            assert await self.client.connect(), "maim client could not connect"
        return self

    async def refused(self, timeout: float = WAIT) -> str:
        """Connect with a key that must be refused; returns the refusal reason the server sent."""
        await self.client.start()
        task = asyncio.create_task(self.client.connect())
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                reasons = [line for line in self.log.lines if "'message':" in line]
                if self.client.get_last_error() and reasons:
                    return reasons[-1]
                if self.client.is_connected():
                    raise AssertionError("a refused key got connected")
                await asyncio.sleep(0.02)
            raise AssertionError("no refusal seen")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def send(self, message: APIMessageBase) -> None:
        assert await self.client.send_message(message)

    async def reply(self, timeout: float = WAIT):
        message, _meta = await asyncio.wait_for(self.replies.get(), timeout)
        return message

    async def error(self, timeout: float = WAIT) -> dict:
        return await asyncio.wait_for(self.errors.get(), timeout)

    async def reply_or_error(self, timeout: float = 10.0) -> tuple[str, object]:
        """("reply", message) or ("error", payload): whichever the server sends first."""
        reply = asyncio.create_task(self.replies.get())
        error = asyncio.create_task(self.errors.get())
        done, pending = await asyncio.wait({reply, error}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        assert done, "neither a reply nor an error"
        return ("error", error.result()) if error in done else ("reply", reply.result()[0])

    async def stop(self) -> None:
        await self.client.stop()


async def wait_for(predicate, timeout: float = WAIT, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


def run(coro):
    return asyncio.run(coro)


async def socketio_connect(url: str, headers: dict[str, str] | None = None, query: str = "") -> dict | None:
    """One Socket.IO connect over a raw websocket: the server's refusal (`{"message": ...}`), None if
    accepted. Cheaper than a maim client (no retries, no background tasks) for bursts of refusals."""
    import websockets

    async with websockets.connect(f"{url}/?EIO=4&transport=websocket{query}", additional_headers=headers) as ws:
        assert str(await ws.recv()).startswith("0")  # Engine.IO open
        await ws.send("40")
        answer = str(await ws.recv())
    if answer.startswith("44"):
        return json.loads(answer[2:])
    assert answer.startswith("40"), answer
    return None
