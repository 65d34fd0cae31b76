"""The maim_message wire formats: parse and validate inbound messages, build replies, acks and errors.

Two generations share the Socket.IO endpoint (event name "message"):

* API-Server (`maim_message.client.WebSocketClient`): envelopes
  `{ver, msg_id, type: sys_std|sys_ack|custom_*, meta, payload}`; `sys_std` payloads are
  `APIMessageBase` dicts. Replies must be `sys_std` envelopes whose payload has `message_dim` and
  `message_info.time`, or the maim client drops them.
* Legacy (`maim_message.Router` / `MessageClient`): bare `MessageBase` dicts both ways.

Parsing uses maim_message's own classes; validation adds what they do not check (types, sizes, ids).
Nothing here decides a tenant: `message_dim` is required by the format but never trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import maim_message  # noqa: F401  (installs its logger; silenced below)
from maim_message.message import (
    APIMessageBase,
    BaseMessageInfo,
    GroupInfo,
    MessageDim,
    ReceiverInfo,
    Seg,
    SenderInfo,
    UserInfo,
)
from maim_message.message_base import BaseMessageInfo as LegacyMessageInfo
from maim_message.message_base import GroupInfo as LegacyGroupInfo
from maim_message.message_base import MessageBase
from maim_message.message_base import Seg as LegacySeg
from maim_message.message_base import UserInfo as LegacyUserInfo

from isolation.context import ID_CHARS

# `import maim_message` installs an INFO handler that logs raw API keys.
logging.getLogger("maim_message").setLevel(logging.WARNING)

API = "api"
LEGACY = "legacy"

REPLY_ID_PREFIX = "mt-reply:"
KNOWN_SEGMENT_TYPES = frozenset(
    {
        "text",
        "image",
        "emoji",
        "seglist",
        "at",
        "reply",
        "face",
        "voice",
        "imageurl",
        "file",
        "video",
        "forward",
        "notify",
    }
)
# Inline media: base64 data, replaced by a placeholder (type, size, SHA-256) before anything is stored.
MEDIA_SEGMENT_TYPES = frozenset({"image", "emoji", "voice"})
DEFAULT_MAX_MEDIA_BYTES = 10 * 1024 * 1024  # MAX_MEDIA_BYTES's default
NOTIFY = "notify"
ECHO = "echo"
MAX_SEGMENTS = 64
MAX_SEG_DEPTH = 4
MAX_ID_CHARS = 100
MAX_PEER_CHARS = 128
MAX_NAME_CHARS = 256
_PLATFORM_RE = re.compile(rf"^{ID_CHARS}{{1,64}}$")  # isolation's id alphabet, the REST API's 64 characters
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


_ID_PREFIX = secrets.token_hex(4)
_counter = itertools.count(1)


def _new_msg_id(kind: str) -> str:
    """A unique envelope id (process prefix + counter; cheaper than uuid4 per message)."""
    return f"{kind}_{_ID_PREFIX}{next(_counter):x}"


class BadInput(ValueError):
    """An inbound message that cannot be processed; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(slots=True)
class Inbound:
    """A validated inbound chat message (fields the server may trust only as *content*)."""

    protocol: str
    msg_id: str | None
    message_id: str
    platform: str
    time: float
    text: str
    segments: dict
    user_id: str | None
    nickname: str | None
    group_id: str | None
    group_name: str | None
    reply_to: str | None = None
    # The ids as the JSON had them (an int stays an int in replies and errors); None: same as the text.
    user_id_json: str | int | None = None
    group_id_json: str | int | None = None
    media_chars: int = 0  # characters of inline media data the placeholders replaced
    # When it reached this replier (wall clock): its stored time and its place in its stream's order,
    # whichever replier or database worker gets to store it first (`replier.stream_locks`).
    received_at: float = field(default_factory=time.time)

    @property
    def route(self) -> Route:
        """Where answers about this message go (its chat, with the ids as they arrived)."""
        return Route(
            self.platform,
            self.user_id_json if self.user_id_json is not None else self.user_id,
            self.nickname,
            self.group_id_json if self.group_id_json is not None else self.group_id,
            self.group_name,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """The chat of a message: platform, user and group as they arrived (ids keep their JSON type).

    Every reply and error carries it, so an adapter can post the answer in that chat (group_info,
    user_info); best-effort for a message that failed validation (`route_of`)."""

    platform: str | None = None
    user_id: str | int | None = None
    nickname: str | None = None
    group_id: str | int | None = None
    group_name: str | None = None

    def legacy_infos(self) -> tuple[LegacyGroupInfo | None, LegacyUserInfo | None]:
        platform = self.platform or "maitenant"
        group = LegacyGroupInfo(platform, self.group_id, self.group_name) if self.group_id is not None else None
        user = LegacyUserInfo(platform, self.user_id, self.nickname) if self.user_id is not None else None
        return group, user

    def as_dicts(self) -> dict:
        """`group_info` and `user_info` as dicts (the API-Server error payload)."""
        group, user = self.legacy_infos()
        return {"group_info": group.to_dict() if group else None, "user_info": user.to_dict() if user else None}


@dataclass(frozen=True, slots=True)
class Notice:
    """A `notify` message from an adapter: not a chat message (never stored, answered or sent to a model).

    `kind` is the notify's `sub_type`. An echo (`kind == "echo"`) reports that the adapter delivered
    our reply `reply_id`, and the id the platform gave it (`platform_message_id`)."""

    kind: str
    platform: str
    user_id: str | None
    group_id: str | None
    reply_id: str | None = None
    platform_message_id: str | None = None


@dataclass(slots=True)
class Envelope:
    """What the API-Server envelope says before its payload is looked at."""

    type: str
    msg_id: str | None


# -- field checks ------------------------------------------------------------------------------
def _id_value(value: Any, field: str, max_chars: int, required: bool = True) -> str | None:
    if value is None or value == "":
        if required:
            raise BadInput("missing_field", f"{field} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadInput("invalid_field", f"{field} must be a string")
    text = str(value)
    if len(text) > max_chars:
        raise BadInput("invalid_field", f"{field} is longer than {max_chars} characters")
    if _CONTROL_RE.search(text) or not text.strip():
        raise BadInput("invalid_field", f"{field} must be printable and not blank")
    return text


def _platform(value: Any) -> str:
    text = _id_value(value, "message_info.platform", 64)
    if not _PLATFORM_RE.match(text):
        raise BadInput("invalid_field", "message_info.platform may hold only letters, digits and _.:@-")
    return text


def _time(value: Any) -> float:
    # A missing time never gets here: maim_message refuses an API message without one, and a legacy
    # message without one is stamped with the server's time.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise BadInput("invalid_field", "message_info.time must be a unix timestamp")
    return float(value)


def _message_id(value: Any) -> str:
    text = _id_value(value, "message_info.message_id", MAX_ID_CHARS)
    if text.startswith(REPLY_ID_PREFIX):
        raise BadInput("invalid_field", f"message ids starting with {REPLY_ID_PREFIX!r} are reserved")
    return text


def _short(value: Any, max_chars: int) -> str | None:
    """Optional display text (nickname, group name, reply id), cut to `max_chars`; numbers become text."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):  # a binary attachment: its repr ("b'…'") is not a name
        raise BadInput("invalid_field", "names and ids must be text, not binary data")
    text = str(value).replace("\x00", "")
    return text[:max_chars] or None


def _refuse_binary(seg: Any) -> None:
    """Refuse `bytes` anywhere in a segment tree (it is stored as JSON, and the protocol is JSON only).

    A Socket.IO binary event (python-socketio's client sends one whenever the data holds `bytes`)
    arrives with its attachments as `bytes` inside the decoded data.
    """
    stack = [seg]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, bytes | bytearray):
            raise BadInput("invalid_segment", "segments must be JSON: binary data (attachments) is not accepted")


@dataclass(slots=True)
class Segments:
    """A validated segment tree: its plain text (for the model), the tree to store (inline media
    replaced by placeholders) and how many characters of media data were replaced."""

    text: str
    stored: dict
    media_chars: int = 0
    media_bytes: int = 0


def media_placeholder(seg_type: str, data: str) -> dict:
    """What is stored instead of an inline image, emoji or voice: its type, size and SHA-256.

    The data is base64 (MaiBot adapters send files so); its decoded size and hash describe the file.
    Data that is not base64 (e.g. a URL some adapters put there) is described as the text it is."""
    compact = data.strip()
    try:
        raw = base64.b64decode(compact, validate=True)
        encoding = "base64"
    except (binascii.Error, ValueError):
        raw = data.encode("utf-8", "surrogatepass")
        encoding = "text"
    return {
        "type": seg_type,
        "data": {
            "placeholder": True,
            "encoding": encoding,
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
    }


def _media_bytes(data: str) -> int:
    """The decoded size of base64 `data` (its text size when it is not base64), without decoding."""
    compact = data.strip()
    if len(compact) % 4 == 0 and compact and compact.isascii():
        return len(compact) // 4 * 3 - compact.count("=", -2)
    return len(data.encode("utf-8", "surrogatepass"))


def parse_segments(seg: dict, max_text_bytes: int, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES) -> Segments:
    """Validate a segment tree (types, nesting, sizes, JSON only): its text, and what to store.

    Inline media (image, emoji, voice with string data) up to `max_media_bytes` in all is accepted and
    stored as a placeholder (`media_placeholder`); the model sees `[image]`, `[emoji]`, `[voice]`."""
    _refuse_binary(seg)
    parts: list[str] = []
    count = 0
    text_bytes = 0
    media_chars = 0
    media_bytes = 0

    def walk(node: Any, depth: int) -> Any:
        nonlocal count, text_bytes, media_chars, media_bytes
        if not isinstance(node, dict):
            raise BadInput("invalid_segment", "a segment must be an object with type and data")
        count += 1
        if count > MAX_SEGMENTS:
            raise BadInput("too_many_segments", f"at most {MAX_SEGMENTS} segments per message")
        seg_type = node.get("type")
        data = node.get("data")
        if not isinstance(seg_type, str):
            raise BadInput("invalid_segment", "segment type must be a string")
        if seg_type not in KNOWN_SEGMENT_TYPES:
            raise BadInput("unknown_segment_type", f"unknown segment type {seg_type[:40]!r}")
        if seg_type == "seglist":
            if depth >= MAX_SEG_DEPTH:
                raise BadInput("invalid_segment", f"segments nest at most {MAX_SEG_DEPTH} levels")
            if not isinstance(data, list):
                raise BadInput("invalid_segment", "seglist data must be a list")
            return {**node, "data": [walk(child, depth + 1) for child in data]}
        if seg_type == "text":
            if not isinstance(data, str):
                raise BadInput("invalid_segment", "text segment data must be a string")
            if "\x00" in data:
                raise BadInput("invalid_segment", "text must not contain NUL characters")
            text_bytes += len(data.encode("utf-8"))
            if text_bytes > max_text_bytes:
                raise BadInput("text_too_long", f"message text is longer than {max_text_bytes} bytes")
            parts.append(data)
        elif seg_type == "at":
            parts.append(f"@{str(data)[:64]}")
        elif seg_type == "reply":
            return node
        elif seg_type in MEDIA_SEGMENT_TYPES and isinstance(data, str):
            media_bytes += _media_bytes(data)
            if media_bytes > max_media_bytes:
                raise BadInput(
                    "media_too_large",
                    f"{seg_type} is too large: at most {max_media_bytes} bytes of images, emoji and voice per message",
                )
            media_chars += len(data)
            parts.append(f"[{seg_type}]")
            return media_placeholder(seg_type, data)
        else:
            parts.append(f"[{seg_type}]")
        return node

    stored = walk(seg, 0)
    text = "".join(parts).strip()
    if not text:
        raise BadInput("empty_message", "message has no content")
    return Segments(text, stored, media_chars, media_bytes)


def segment_text(seg: dict, max_text_bytes: int, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES) -> str:
    """Validate a segment tree and return its plain text (see `parse_segments`)."""
    return parse_segments(seg, max_text_bytes, max_media_bytes).text


def _notify(seg: Any) -> dict | None:
    """The `notify` segment of a message (the segment itself, or one inside its seglist), if any."""
    if not isinstance(seg, dict):
        return None
    if seg.get("type") == NOTIFY:
        return seg
    if seg.get("type") == "seglist" and isinstance(seg.get("data"), list):
        for child in seg["data"][:MAX_SEGMENTS]:
            if isinstance(child, dict) and child.get("type") == NOTIFY:
                return child
    return None


def _notice(platform: str, info: Any, notify: dict, user: Any, group: Any) -> Notice:
    """The `Notice` of a message with a `notify` segment (see `Notice`)."""
    data = notify.get("data") if isinstance(notify.get("data"), dict) else {}
    kind = data.get("sub_type")
    kind = kind[:40] if isinstance(kind, str) and kind else "unknown"
    user_id = _id_value(getattr(user, "user_id", None), "user_info.user_id", MAX_PEER_CHARS, required=False)
    group_id = _id_value(getattr(group, "group_id", None), "group_info.group_id", MAX_PEER_CHARS, required=False)
    reply_id = platform_id = None
    if kind == ECHO:
        reply_id = _short(data.get("echo") or getattr(info, "message_id", None), MAX_ID_CHARS)
        platform_id = _id_value(data.get("actual_id"), "notify.actual_id", MAX_ID_CHARS, required=False)
    return Notice(kind, platform, user_id, group_id, reply_id, platform_id)


def _reply_to(seg: dict) -> str | None:
    # A lone top-level "reply" segment has no text and is refused before this is asked.
    if seg.get("type") == "seglist" and isinstance(seg.get("data"), list):
        for child in seg["data"]:
            if isinstance(child, dict) and child.get("type") == "reply":
                return _short(child.get("data"), MAX_ID_CHARS)
    return None


def _peers(user: Any, group: Any) -> tuple[str | None, str | None, str | None, str | None]:
    user_id = nickname = group_id = group_name = None
    if user is not None:
        user_id = _id_value(getattr(user, "user_id", None), "user_info.user_id", MAX_PEER_CHARS, required=False)
        nickname = _short(getattr(user, "user_nickname", None) or getattr(user, "user_cardname", None), MAX_NAME_CHARS)
    if group is not None:
        group_id = _id_value(getattr(group, "group_id", None), "group_info.group_id", MAX_PEER_CHARS, required=False)
        group_name = _short(getattr(group, "group_name", None), MAX_NAME_CHARS)
    if not user_id and not group_id:
        raise BadInput(
            "missing_field", "a message needs sender user_info.user_id or group_info.group_id to pick its chat"
        )
    return user_id, nickname, group_id, group_name


def _inbound(
    protocol: str,
    msg_id: str | None,
    info: Any,
    segments: dict,
    max_text_bytes: int,
    user: Any,
    group: Any,
    *,
    default_time: bool = False,
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES,
) -> Inbound | Notice:
    """The `Inbound` of a parsed message's info (either protocol's `BaseMessageInfo`) and segments,
    or the `Notice` of a `notify` message. A legacy message may leave out its time (`default_time`: now)."""
    platform = _platform(info.platform)
    notify = _notify(segments)
    if notify is not None:
        return _notice(platform, info, notify, user, group)
    message_id = _message_id(info.message_id)
    timestamp = time.time() if default_time and info.time is None else _time(info.time)
    parsed = parse_segments(segments, max_text_bytes, max_media_bytes)
    user_id, nickname, group_id, group_name = _peers(user, group)
    user_raw = getattr(user, "user_id", None) if user is not None else None
    group_raw = getattr(group, "group_id", None) if group is not None else None
    return Inbound(
        protocol=protocol,
        msg_id=msg_id,
        message_id=message_id,
        platform=platform,
        time=timestamp,
        text=parsed.text,
        segments=parsed.stored,
        user_id=user_id,
        nickname=nickname,
        group_id=group_id,
        group_name=group_name,
        reply_to=_reply_to(segments),
        user_id_json=user_raw if user_id is not None and isinstance(user_raw, int) else None,
        group_id_json=group_raw if group_id is not None and isinstance(group_raw, int) else None,
        media_chars=parsed.media_chars,
    )


# -- API-Server --------------------------------------------------------------------------------
def parse_envelope(data: Any) -> Envelope:
    """The envelope's type and msg_id; raises `BadInput` for something that is not an envelope."""
    if not isinstance(data, dict):
        raise BadInput("invalid_envelope", "expected a JSON object envelope {ver, msg_id, type, meta, payload}")
    msg_type = data.get("type")
    msg_id = data.get("msg_id")
    if msg_id is not None and (not isinstance(msg_id, str) or not msg_id or len(msg_id) > 128):
        msg_id = None
    if not isinstance(msg_type, str) or not msg_type:
        raise BadInput("invalid_envelope", "envelope type is required (sys_std, sys_ack or custom_*)")
    return Envelope(msg_type, msg_id)


def parse_api_message(
    envelope: Envelope, data: dict, max_text_bytes: int, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES
) -> Inbound | Notice:
    """Validate a `sys_std` envelope's payload into an `Inbound` (a `Notice` for a notify message)."""
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise BadInput("invalid_payload", "sys_std payload must be an APIMessageBase object")
    for name in ("message_info", "message_segment", "message_dim"):
        if not isinstance(payload.get(name), dict):
            raise BadInput("missing_field", f"payload.{name} is required")
    try:
        message = APIMessageBase.from_dict(payload)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput("invalid_payload", f"invalid APIMessageBase: {exc}") from None
    info = message.message_info
    sender = info.sender_info
    user, group = (sender.user_info, sender.group_info) if sender else (None, None)
    receiver = info.receiver_info
    if _notify(payload["message_segment"]) is not None and receiver is not None:
        # an echo of our reply names the chat as its receiver (the sender is the agent)
        user, group = receiver.user_info or user, receiver.group_info or group
    return _inbound(
        API,
        envelope.msg_id,
        info,
        payload["message_segment"],
        max_text_bytes,
        user,
        group,
        max_media_bytes=max_media_bytes,
    )


def build_ack(msg_id: str, connection_id: str) -> dict:
    now = time.time()
    return {
        "ver": 1,
        "msg_id": _new_msg_id("ack"),
        "type": "sys_ack",
        "meta": {"uuid": connection_id, "acked_msg_id": msg_id, "timestamp": now},
        "payload": {"status": "received", "server_timestamp": now},
    }


def build_api_error(
    code: str,
    message: str,
    *,
    msg_id: str | None = None,
    message_id: str | None = None,
    route: Route | None = None,
    retryable: bool = False,
    details: dict | None = None,
) -> dict:
    """A `custom_error` envelope (maim clients deliver it to a handler registered for "custom_error").

    Its payload names the message (`msg_id`, `message_id`) and its chat (`platform`, `group_info`,
    `user_info`, ids as they arrived), so a client can show the error where the message was sent.
    `retryable: true` tells the client that the same message may succeed later (a database outage):
    nothing was stored, send it again after a pause. `details` (e.g. a limit's `retry_after`) are added
    to the payload."""
    route = route or Route()
    payload = {
        "code": code,
        "message": message,
        "msg_id": msg_id,
        "message_id": message_id,
        "platform": route.platform,
        **route.as_dicts(),
    }
    if retryable:
        payload["retryable"] = True
    if details:
        payload.update({k: v for k, v in details.items() if k not in payload})
    return {
        "ver": 1,
        "msg_id": _new_msg_id("err"),
        "type": "custom_error",
        "meta": {"sender_user": "server", "timestamp": time.time()},
        "payload": payload,
    }


def _bot_user(platform: str, agent_name: str) -> tuple[UserInfo, LegacyUserInfo]:
    return UserInfo(platform=platform, user_id="maitenant-agent", user_nickname=agent_name), LegacyUserInfo(
        platform=platform, user_id="maitenant-agent", user_nickname=agent_name
    )


def build_api_reply(
    inbound: Inbound, *, reply_id: str, text: str, api_key: str, agent_name: str, metadata: dict
) -> dict:
    """A `sys_std` envelope carrying the reply as an `APIMessageBase`."""
    now = time.time()
    platform = inbound.platform
    route = inbound.route
    group = GroupInfo(platform, route.group_id, inbound.group_name) if inbound.group_id else None
    user = UserInfo(platform, route.user_id, inbound.nickname) if inbound.user_id else None
    bot, _ = _bot_user(platform, agent_name)
    message = APIMessageBase(
        message_info=BaseMessageInfo(
            platform=platform,
            message_id=reply_id,
            time=now,
            additional_config={"maitenant": metadata},
            sender_info=SenderInfo(group_info=group, user_info=bot),
            receiver_info=ReceiverInfo(group_info=group, user_info=user),
        ),
        message_segment=Seg(type="text", data=text),
        message_dim=MessageDim(api_key=api_key, platform=platform),
    )
    return {
        "ver": 1,
        "msg_id": _new_msg_id("msg"),
        "type": "sys_std",
        "meta": {
            "sender_user": "server",
            "target_user": route.user_id if inbound.user_id else route.group_id,
            "platform": platform,
            "timestamp": now,
            "maitenant": metadata,
        },
        "payload": message.to_dict(),
    }


# -- legacy ------------------------------------------------------------------------------------
def parse_legacy_message(
    data: Any, max_text_bytes: int, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES
) -> Inbound | Notice:
    """Validate a bare `MessageBase` dict into an `Inbound` (a `Notice` for a notify message, such as
    MaiBot-Napcat-Adapter's echo after each delivered reply)."""
    if not isinstance(data, dict):
        raise BadInput("invalid_message", "expected a MessageBase object {message_info, message_segment}")
    if data.get("is_custom_message"):
        raise BadInput("unsupported_message", "custom messages are not supported by this server")
    info = data.get("message_info")
    segments = data.get("message_segment")
    if not isinstance(info, dict):
        raise BadInput("missing_field", "message_info is required")
    if not isinstance(segments, dict):
        raise BadInput("missing_field", "message_segment is required")
    try:
        message = MessageBase.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput("invalid_message", f"invalid MessageBase: {exc}") from None
    minfo = message.message_info
    user = minfo.user_info or (minfo.sender_info.user_info if minfo.sender_info else None)
    group = minfo.group_info or (minfo.sender_info.group_info if minfo.sender_info else None)
    return _inbound(
        LEGACY, None, minfo, segments, max_text_bytes, user, group, default_time=True, max_media_bytes=max_media_bytes
    )


def build_legacy_reply(inbound: Inbound, *, reply_id: str, text: str, agent_name: str, metadata: dict) -> dict:
    group, user = inbound.route.legacy_infos()
    info = LegacyMessageInfo(
        platform=inbound.platform,
        message_id=reply_id,
        time=time.time(),
        group_info=group,
        user_info=user,
        additional_config={"maitenant": metadata},
    )
    return MessageBase(message_info=info, message_segment=LegacySeg(type="text", data=text)).to_dict()


def build_legacy_error(
    code: str,
    message: str,
    *,
    platform: str | None = None,
    message_id: str | None = None,
    route: Route | None = None,
    retryable: bool = False,
    details: dict | None = None,
) -> dict:
    """A bare MessageBase whose text states the error; `additional_config.maitenant.error` has the code
    (and `retryable: true` when sending the message again later may succeed, and `details`).

    It carries the failed message's `group_info`/`user_info` (ids as they arrived), so an adapter such
    as MaiBot-Napcat-Adapter posts it in that chat like any reply."""
    route = route or Route(platform)
    group, user = route.legacy_infos()
    error: dict = {"code": code, "message": message, "message_id": message_id}
    if retryable:
        error["retryable"] = True
    if details:
        error.update({k: v for k, v in details.items() if k not in error})
    info = LegacyMessageInfo(
        platform=route.platform or platform or "maitenant",
        message_id=f"mt-error:{_new_msg_id('e')}",
        time=time.time(),
        group_info=group,
        user_info=user,
        additional_config={"maitenant": {"error": error}},
    )
    return MessageBase(
        message_info=info, message_segment=LegacySeg(type="text", data=f"[error {code}] {message}")
    ).to_dict()


def _raw_id(value: Any) -> str | int | None:
    """An id from unvalidated input, if it is one (a short string or an int), as it arrived."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and len(str(value)) <= MAX_PEER_CHARS:
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_PEER_CHARS and not _CONTROL_RE.search(value):
        return value
    return None


def _raw_name(value: Any) -> str | None:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) and not _CONTROL_RE.search(value) else None


def route_of(data: Any, protocol: str) -> Route:
    """The chat a message that failed validation was sent in, as far as it can be read (never raises).

    API-Server: `payload.message_info.sender_info`; legacy: `message_info.user_info`/`group_info` (or
    its `sender_info`). Only well-formed ids and names are taken; a platform outside the id alphabet is
    left out."""
    info: Any = None
    if isinstance(data, dict):
        info = (data.get("payload") or {}) if protocol == API else data
        info = info.get("message_info") if isinstance(info, dict) else None
    if not isinstance(info, dict):
        return Route()
    holder = info.get("sender_info") if protocol == API else info
    holder = holder if isinstance(holder, dict) else {}
    sender = info.get("sender_info") if isinstance(info.get("sender_info"), dict) else {}
    user = holder.get("user_info") or sender.get("user_info")
    group = holder.get("group_info") or sender.get("group_info")
    user = user if isinstance(user, dict) else {}
    group = group if isinstance(group, dict) else {}
    platform = info.get("platform")
    platform = platform if isinstance(platform, str) and _PLATFORM_RE.match(platform) else None
    return Route(
        platform,
        _raw_id(user.get("user_id")),
        _raw_name(user.get("user_nickname")),
        _raw_id(group.get("group_id")),
        _raw_name(group.get("group_name")),
    )
