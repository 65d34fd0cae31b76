"""One maim_message `WebSocketClient` per chat connection, as a MaiBot adapter would use it.

`ChatConnection.ask()` sends one user message and waits for the reply to *that* message (the replier
marks replies with `reply_to` = the user message's id); replies to other messages that arrive
meanwhile are kept in `stray` so a test can tell "late" from "never".
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import maim_message  # noqa: F401  (installs its INFO handler, which logs raw API keys)
from maim_message.client import WebSocketClient
from maim_message.message import APIMessageBase, BaseMessageInfo, GroupInfo, MessageDim, Seg, SenderInfo, UserInfo
from maim_message.ws_config import ClientConfig

logging.getLogger("maim_message").setLevel(logging.WARNING)

REPLY_ID_PREFIX = "mt-reply:"  # the replier's reply ids: "mt-reply:<user message id>"


class ChatError(RuntimeError):
    """The connection could not be opened, a send failed, or no reply came in time."""


@dataclass
class Reply:
    text: str
    message_id: str
    reply_to: str | None
    metadata: dict
    group_id: str | None
    receiver_user_id: str | None
    received_at: float  # time.perf_counter()

    @property
    def offline(self) -> bool:
        return bool(self.metadata.get("offline"))

    @property
    def chat_stream_id(self) -> str | None:
        return self.metadata.get("chat_stream_id")


@dataclass
class ChatConnection:
    """A chat on one platform, in one group, as one user, through one maim_message client."""

    url: str
    api_key: str
    platform: str
    user_id: str
    nickname: str
    group_id: str | None = None
    replies: asyncio.Queue = field(default_factory=asyncio.Queue)
    errors: list[dict] = field(default_factory=list)
    stray: list[Reply] = field(default_factory=list)
    client: WebSocketClient | None = None

    def _make_client(self) -> WebSocketClient:
        async def on_message(message: APIMessageBase, meta: dict) -> None:
            await self.replies.put(parse_reply(message, meta))

        async def on_error(payload: dict) -> None:
            self.errors.append(payload)
            await self.replies.put(payload)

        config = ClientConfig(url=self.url, api_key=self.api_key, platform=self.platform, on_message=on_message)
        config.register_custom_handler("custom_error", on_error)
        return WebSocketClient(config)

    async def open(self) -> None:
        self.client = self._make_client()
        await self.client.start()
        if not await self.client.connect():
            reason = self.client.get_last_error() or "no connection confirmation within 10 s"
            await self.close()
            raise ChatError(f"cannot connect to {self.url} as platform {self.platform}: {reason}")

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.stop()

    def message(self, text: str, message_id: str | None = None, *, dim_api_key: str | None = None) -> APIMessageBase:
        """A user message of this chat (`dim_api_key` lets a test write someone else's key there)."""
        platform = self.platform
        sender = SenderInfo(
            group_info=GroupInfo(platform, self.group_id) if self.group_id else None,
            user_info=UserInfo(platform, self.user_id, self.nickname),
        )
        return APIMessageBase(
            message_info=BaseMessageInfo(
                platform=platform, message_id=message_id or uuid.uuid4().hex, time=time.time(), sender_info=sender
            ),
            message_segment=Seg("text", text),
            message_dim=MessageDim(api_key=dim_api_key or self.api_key, platform=platform),
        )

    async def send(self, message: APIMessageBase) -> None:
        if self.client is None or not await self.client.send_message(message):
            raise ChatError("send failed: the connection is not open")

    async def ask(self, text: str, message_id: str, timeout: float, **kwargs: Any) -> tuple[Reply, float]:
        """Send `text` and wait for its reply; returns the reply and the latency in seconds."""
        started = time.perf_counter()
        await self.send(self.message(text, message_id, **kwargs))
        reply = await self.wait_reply(message_id, timeout)
        return reply, reply.received_at - started

    async def wait_reply(self, message_id: str, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChatError(f"no reply to {message_id} within {timeout:g} s")
            try:
                item = await asyncio.wait_for(self.replies.get(), left)
            except TimeoutError:
                continue
            if isinstance(item, dict):  # a custom_error from the replier
                if item.get("message_id") in (message_id, None):
                    raise ChatError(f"replier error {item.get('code')}: {item.get('message')}")
                continue
            if item.reply_to == message_id or item.message_id == REPLY_ID_PREFIX + message_id:
                return item
            self.stray.append(item)

    async def drain(self, wait: float = 0.0) -> list[Reply]:
        """Whatever arrived (after waiting `wait` seconds) that nobody asked for."""
        if wait:
            await asyncio.sleep(wait)
        while not self.replies.empty():
            item = self.replies.get_nowait()
            if isinstance(item, Reply):
                self.stray.append(item)
        return list(self.stray)


def parse_reply(message: APIMessageBase, meta: dict) -> Reply:
    info = message.message_info
    extra = (info.additional_config or {}).get("maitenant") or (meta or {}).get("maitenant") or {}
    segment = message.message_segment
    text = segment.data if segment is not None and segment.type == "text" else str(getattr(segment, "data", ""))
    group = info.sender_info.group_info if info.sender_info else None
    receiver = info.receiver_info.user_info if getattr(info, "receiver_info", None) else None
    return Reply(
        text=text,
        message_id=str(info.message_id),
        reply_to=extra.get("reply_to"),
        metadata=dict(extra),
        group_id=group.group_id if group else None,
        receiver_user_id=receiver.user_id if receiver else None,
        received_at=time.perf_counter(),
    )


async def close_all(connections: list[ChatConnection]) -> None:
    """Stop many clients at once (each `stop()` sleeps about half a second)."""
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
