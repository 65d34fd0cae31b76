"""Inbound messages: parse, size check, acknowledgement and dedup, in either protocol.

A connection's "message" events arrive here in order. What fails a check is answered with its error
code (and never acknowledged). A valid chat message goes on to `Streams.accept`.

The acknowledgement (`sys_ack`, API-Server protocol only; legacy clients get none) means **stored**:
it is sent once the message's row is committed (`Streams.on_stored`), never before; a message that
cannot be stored gets an error instead. A crash after the ack cannot lose the message: the restarted
replier answers it (recovery, `replier.recovery`).

Duplicate envelopes (the same `msg_id` from the same tenant's agent within `dedup_ttl_seconds`, as
maim's client re-sends unacknowledged envelopes after a reconnect) are not processed again:
- if the first one is stored (acknowledged), the duplicate is acknowledged again at once;
- if the first one's store has not committed yet, the duplicate gets nothing: the first one's ack,
  when it comes, answers both (a second ack before the store commits would claim what is not true);
- if the first one failed (an error, no ack), its id is forgotten, so a re-send is processed anew.
Only the envelope id is deduplicated here; the chat message id is decided by the database (an identical
resend is a replay of the stored reply, a reused id with new content is a new message: see
`isolation.fastpath.ChatSession.store_inbound`).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Any

import orjson

from replier.connections import Connection, StreamKey
from replier.echoes import Echoes
from replier.protocol import (
    API,
    LEGACY,
    BadInput,
    Inbound,
    Notice,
    parse_api_message,
    parse_envelope,
    parse_legacy_message,
    route_of,
)
from replier.stage import Shared, Stage
from replier.streams import Streams

MAX_DEDUP = 500_000


def _stand_in(value: Any) -> str:
    """Binary attachments (a Socket.IO binary event) count with their length."""
    if isinstance(value, bytes):
        return "x" * len(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def encoded_size(data: Any) -> int:
    """The size of `data` as JSON (what the client sent, give or take whitespace).

    Inbound data comes from orjson (JSON only) plus, for a binary event, `bytes` attachments; those
    are counted instead of making the size unknown (which used to let them past the size limit).
    """
    return len(orjson.dumps(data, default=_stand_in))


def _payload_message_id(payload: Any, *path: str) -> str | None:
    """The chat message id at `path` inside a rejected payload, if it has one (for the error)."""
    with contextlib.suppress(KeyError, TypeError):
        for name in path:
            payload = payload[name]
        value = payload["message_id"]
        return str(value)[:100] if value is not None else None
    return None


PENDING = "pending"  # the envelope's message is not stored yet
ACKED = "acked"  # stored and acknowledged


class Dedup:
    """Envelope ids (`msg_id`) seen per tenant+agent, remembered for `ttl` seconds (at most `MAX_DEDUP`),
    with whether their message is stored (acknowledged) yet."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: OrderedDict[tuple[str, str, str], list] = OrderedDict()  # key -> [expiry, state]

    def check(self, tenant_id: str, agent_id: str, msg_id: str) -> str | None:
        """None for a new envelope id (now remembered as pending), else its state (PENDING or ACKED)."""
        key = (tenant_id, agent_id, msg_id)
        now = time.monotonic()
        seen = self._seen
        while seen:
            _, (expiry, _state) = next(iter(seen.items()))
            if expiry > now and len(seen) < MAX_DEDUP:
                break
            seen.popitem(last=False)
        entry = seen.get(key)
        if entry is not None:
            return entry[1]
        seen[key] = [now + self.ttl, PENDING]
        return None

    def acked(self, tenant_id: str, agent_id: str, msg_id: str) -> None:
        entry = self._seen.get((tenant_id, agent_id, msg_id))
        if entry is not None:
            entry[1] = ACKED

    def forget(self, tenant_id: str, agent_id: str, msg_id: str) -> None:
        """The envelope's message was not stored: a re-send of it is processed anew."""
        self._seen.pop((tenant_id, agent_id, msg_id), None)


class Intake(Stage):
    def __init__(self, shared: Shared, streams: Streams) -> None:
        super().__init__(shared)
        self.streams = streams
        self.dedup = Dedup(shared.settings.dedup_ttl_seconds)
        self.echoes = Echoes(shared)
        streams.on_stored = self._stored
        streams.on_lost = self._lost

    async def on_message(self, sid: str, data: Any = None) -> None:
        conn = self.connections.get(sid)
        if conn is None:
            return
        inbound = await (self._api(conn, data) if conn.protocol == API else self._legacy(conn, data))
        if isinstance(inbound, Notice):
            await self.echoes.accept(conn, inbound)  # an adapter's notify: never answered nor stored as chat
        elif inbound is not None:
            admitted = await self.limits.admit(conn, inbound)  # per-tenant message rates
            if not (admitted and await self.streams.accept(conn, inbound)) and inbound.msg_id:
                self.dedup.forget(conn.tenant_id, conn.agent_id, inbound.msg_id)  # not stored: a re-send counts

    async def _stored(self, key: StreamKey, sid: str | None, inbound: Inbound) -> None:
        """The message's row is committed: acknowledge its envelope (API-Server) to its sender."""
        if inbound.msg_id is None:
            return
        self.dedup.acked(key[0], key[1], inbound.msg_id)
        conn = self.connections.get(sid) if sid is not None else None
        if conn is not None:
            await self.outbox.ack(conn, inbound.msg_id)

    def _lost(self, key: StreamKey, inbound: Inbound) -> None:
        if inbound.msg_id is not None:
            self.dedup.forget(key[0], key[1], inbound.msg_id)

    async def _api(self, conn: Connection, data: Any) -> Inbound | Notice | None:
        try:
            envelope = parse_envelope(data)
        except BadInput as exc:
            await self.outbox.error(conn, exc.code, str(exc))
            return None
        if envelope.type == "sys_ack":
            return None  # never ack an ack
        if envelope.msg_id:
            state = self.dedup.check(conn.tenant_id, conn.agent_id, envelope.msg_id)
            if state is not None:
                self.metrics.duplicates.inc()
                if state == ACKED:
                    await self.outbox.ack(conn, envelope.msg_id)
                return None
        try:
            if envelope.type != "sys_std":
                if envelope.type.startswith("custom_"):
                    raise BadInput(
                        "unsupported_type", f"custom message type {envelope.type[:60]!r} is not handled here"
                    )
                raise BadInput("invalid_envelope", f"unknown envelope type {envelope.type[:60]!r}")
            size = self._check_size(data)
            parsed = parse_api_message(envelope, data, self.settings.max_text_bytes, self.settings.max_media_bytes)
            checked = self._check_rest(parsed, size)
            if isinstance(checked, Notice) and envelope.msg_id:
                # A notify is not a chat message: nothing of it is stored as one, so it is
                # acknowledged as soon as it is read (an echo's platform id is best effort).
                self.dedup.acked(conn.tenant_id, conn.agent_id, envelope.msg_id)
                await self.outbox.ack(conn, envelope.msg_id)
            return checked
        except BadInput as exc:
            if envelope.msg_id:
                self.dedup.forget(conn.tenant_id, conn.agent_id, envelope.msg_id)
            message_id = _payload_message_id(data, "payload", "message_info")
            await self.outbox.error(
                conn, exc.code, str(exc), msg_id=envelope.msg_id, message_id=message_id, route=route_of(data, API)
            )
            return None

    async def _legacy(self, conn: Connection, data: Any) -> Inbound | Notice | None:
        try:
            size = self._check_size(data)
            parsed = parse_legacy_message(data, self.settings.max_text_bytes, self.settings.max_media_bytes)
            return self._check_rest(parsed, size)
        except BadInput as exc:
            message_id = _payload_message_id(data, "message_info")
            route = route_of(data, LEGACY)
            await self.outbox.error(
                conn, exc.code, str(exc), platform=conn.platform, message_id=message_id, route=route
            )
            return None

    def _check_size(self, data: Any) -> int:
        """The message's JSON size; over what any message may be (text and media limits together)
        is `payload_too_large` before it is parsed."""
        try:
            size = encoded_size(data)
        except orjson.JSONEncodeError:  # the only cause for decoded JSON: nesting beyond orjson's 254 levels
            raise BadInput("invalid_payload", "message nests too deeply") from None
        if size > self.settings.max_message_bytes:
            raise BadInput("payload_too_large", f"message is larger than {self.settings.max_message_bytes} bytes")
        return size

    def _check_rest(self, parsed: Inbound | Notice, size: int) -> Inbound | Notice:
        """Without its inline media, a message keeps `max_payload_bytes`."""
        rest = size - (parsed.media_chars if isinstance(parsed, Inbound) else 0)
        limit = self.settings.max_payload_bytes
        if rest > limit:
            raise BadInput("payload_too_large", f"message is larger than {limit} bytes (without its images)")
        return parsed
