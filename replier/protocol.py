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

import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass
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
    {"text", "image", "emoji", "seglist", "at", "reply", "face", "voice", "imageurl", "file", "video", "forward"}
)
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


def segment_text(seg: dict, max_text_bytes: int) -> str:
    """Validate a segment tree (types, nesting, sizes, JSON only) and return its plain text."""
    _refuse_binary(seg)
    parts: list[str] = []
    count = 0
    text_bytes = 0

    def walk(node: Any, depth: int) -> None:
        nonlocal count, text_bytes
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
            for child in data:
                walk(child, depth + 1)
            return
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
            return
        else:
            parts.append(f"[{seg_type}]")

    walk(seg, 0)
    text = "".join(parts).strip()
    if not text:
        raise BadInput("empty_message", "message has no content")
    return text


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
) -> Inbound:
    """The `Inbound` of a parsed message's info (either protocol's `BaseMessageInfo`) and segments.
    A legacy message may leave out its time (`default_time`: now)."""
    platform = _platform(info.platform)
    message_id = _message_id(info.message_id)
    timestamp = time.time() if default_time and info.time is None else _time(info.time)
    text = segment_text(segments, max_text_bytes)
    user_id, nickname, group_id, group_name = _peers(user, group)
    return Inbound(
        protocol=protocol,
        msg_id=msg_id,
        message_id=message_id,
        platform=platform,
        time=timestamp,
        text=text,
        segments=segments,
        user_id=user_id,
        nickname=nickname,
        group_id=group_id,
        group_name=group_name,
        reply_to=_reply_to(segments),
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


def parse_api_message(envelope: Envelope, data: dict, max_text_bytes: int) -> Inbound:
    """Validate a `sys_std` envelope's payload into an `Inbound`."""
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
    return _inbound(API, envelope.msg_id, info, payload["message_segment"], max_text_bytes, user, group)


def build_ack(msg_id: str, connection_id: str) -> dict:
    now = time.time()
    return {
        "ver": 1,
        "msg_id": _new_msg_id("ack"),
        "type": "sys_ack",
        "meta": {"uuid": connection_id, "acked_msg_id": msg_id, "timestamp": now},
        "payload": {"status": "received", "server_timestamp": now},
    }


def build_api_error(code: str, message: str, *, msg_id: str | None = None, message_id: str | None = None) -> dict:
    """A `custom_error` envelope (maim clients deliver it to a handler registered for "custom_error")."""
    return {
        "ver": 1,
        "msg_id": _new_msg_id("err"),
        "type": "custom_error",
        "meta": {"sender_user": "server", "timestamp": time.time()},
        "payload": {"code": code, "message": message, "msg_id": msg_id, "message_id": message_id},
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
    group = GroupInfo(platform, inbound.group_id, inbound.group_name) if inbound.group_id else None
    user = UserInfo(platform, inbound.user_id, inbound.nickname) if inbound.user_id else None
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
            "target_user": inbound.user_id or inbound.group_id,
            "platform": platform,
            "timestamp": now,
            "maitenant": metadata,
        },
        "payload": message.to_dict(),
    }


# -- legacy ------------------------------------------------------------------------------------
def parse_legacy_message(data: Any, max_text_bytes: int) -> Inbound:
    """Validate a bare `MessageBase` dict into an `Inbound`."""
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
    return _inbound(LEGACY, None, minfo, segments, max_text_bytes, user, group, default_time=True)


def build_legacy_reply(inbound: Inbound, *, reply_id: str, text: str, agent_name: str, metadata: dict) -> dict:
    platform = inbound.platform
    info = LegacyMessageInfo(
        platform=platform,
        message_id=reply_id,
        time=time.time(),
        group_info=LegacyGroupInfo(platform, inbound.group_id, inbound.group_name) if inbound.group_id else None,
        user_info=LegacyUserInfo(platform, inbound.user_id, inbound.nickname) if inbound.user_id else None,
        additional_config={"maitenant": metadata},
    )
    return MessageBase(message_info=info, message_segment=LegacySeg(type="text", data=text)).to_dict()


def build_legacy_error(code: str, message: str, *, platform: str | None = None, message_id: str | None = None) -> dict:
    """A bare MessageBase whose text states the error; `additional_config.maitenant.error` has the code."""
    info = LegacyMessageInfo(
        platform=platform or "maitenant",
        message_id=f"mt-error:{_new_msg_id('e')}",
        time=time.time(),
        additional_config={"maitenant": {"error": {"code": code, "message": message, "message_id": message_id}}},
    )
    return MessageBase(
        message_info=info, message_segment=LegacySeg(type="text", data=f"[error {code}] {message}")
    ).to_dict()
