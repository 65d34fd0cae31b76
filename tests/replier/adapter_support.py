"""A stand-in for MaiBot-Napcat-Adapter v0.4.x at the protocol level, built from maim_message's own classes.

What it does is what the adapter does (docs/ADAPTERS.md has the file paths in its repository):

- connects with the legacy `Router` and `TargetConfig(token=None)` (`src/mmc_com_layer.py`): the
  `platform` header, no key;
- sends `MessageBase` dicts with integer user, group and message ids, a `seglist` of `text` and base64
  `image`/`emoji`/`voice` segments (`src/recv_handler/message_handler.py`);
- after every reply it delivers, sends the reply back with `additional_config["echo"] = True` and a
  `notify` segment `{"sub_type": "echo", "echo": <our reply's message_id>, "actual_id": <QQ's id>}`
  (`SendHandler.message_sent_back` in `src/send_handler.py`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import time
from dataclasses import dataclass, field

from maim_message import (
    BaseMessageInfo,
    FormatInfo,
    GroupInfo,
    MessageBase,
    RouteConfig,
    Router,
    Seg,
    TargetConfig,
    UserInfo,
)
from replier_support import wait_for

PLATFORM = "qq"


def media(size: int) -> tuple[str, str]:
    """(base64 of `size` random bytes, their SHA-256)."""
    raw = os.urandom(size)
    return base64.b64encode(raw).decode(), hashlib.sha256(raw).hexdigest()


def onebot_message(
    message_id: int,
    segments: list[Seg],
    *,
    user_id: int | str = 1234567,
    group_id: int | str | None = 7654321,
    nickname: str = "QQ user",
) -> MessageBase:
    """A message as the adapter builds it from a OneBot v11 event (ids are JSON numbers)."""
    info = BaseMessageInfo(
        platform=PLATFORM,
        message_id=message_id,
        time=time.time(),
        user_info=UserInfo(platform=PLATFORM, user_id=user_id, user_nickname=nickname, user_cardname=None),
        group_info=GroupInfo(platform=PLATFORM, group_id=group_id, group_name="test group") if group_id else None,
        format_info=FormatInfo(content_format=["text", "image", "emoji", "voice"], accept_format=["text"]),
        additional_config={},
    )
    return MessageBase(message_info=info, message_segment=Seg("seglist", segments), raw_message="[CQ:...]")


@dataclass
class NapcatLikeAdapter:
    """The adapter's MaiBot side: a legacy Router without a token, echoing every reply it receives."""

    url: str
    token: str | None = None
    received: asyncio.Queue = field(default_factory=asyncio.Queue)
    echoed: dict[str, int] = field(default_factory=dict)  # our reply id -> the "QQ message id" it got
    _qq_ids: itertools.count = field(default_factory=lambda: itertools.count(900_001))

    async def start(self) -> NapcatLikeAdapter:
        self.router = Router(RouteConfig({PLATFORM: TargetConfig(url=self.url, token=self.token)}))
        self.router.register_class_handler(self._handle)
        self._task = asyncio.create_task(self.router.run())
        await wait_for(lambda: self.router.check_connection(PLATFORM))
        return self

    async def _handle(self, message: dict) -> None:
        await self.received.put(message)
        message_id = str(message["message_info"].get("message_id", ""))
        if message_id.startswith("mt-"):  # posted to QQ (a reply or an error): echoed as the adapter does
            qq_id = next(self._qq_ids)
            echo = MessageBase.from_dict(message)
            if echo.message_info.additional_config is None:
                echo.message_info.additional_config = {}
            echo.message_info.additional_config["echo"] = True
            echo.message_segment = Seg(
                type="notify", data={"sub_type": "echo", "echo": echo.message_info.message_id, "actual_id": qq_id}
            )
            self.echoed[message_id] = qq_id
            await self.router.send_message(echo)

    async def send(self, message: MessageBase) -> None:
        assert await self.router.send_message(message)

    async def next(self, timeout: float = 20.0) -> dict:
        return await asyncio.wait_for(self.received.get(), timeout)

    def connected(self) -> bool:
        return self.router.check_connection(PLATFORM)

    async def stop(self) -> None:
        await self.router.stop()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
