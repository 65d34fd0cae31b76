"""Malformed Engine.IO / Socket.IO frames: how to recognise them, and a log that counts instead of tracing.

python-engineio 4.15.1 and python-socketio 5.18.1 turn a client's garbage into ERROR tracebacks (two of
them: the library's own stream handler plus the root handler), and some garbage never reaches an
exception handler at all: a websocket text frame that is not an Engine.IO packet escapes as "Exception
in ASGI application". Anyone can send such frames before authenticating, so the log would be theirs to
fill. The checks below run before the libraries decode a frame; what fails them is dropped and counted,
and `MalformedFrames` writes one WARNING line per client address and interval with the count.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from engineio import packet as eio_packet
from engineio import payload as eio_payload
from socketio import packet as sio_packet

log = logging.getLogger("replier")

# What a client may send: CLOSE, PING (only the "2probe" of a transport upgrade, on the websocket),
# PONG, MESSAGE, UPGRADE and NOOP. OPEN and the undefined types 7-9 are never sent by a client.
# Upstream ignores a stray PING or NOOP on a websocket but disconnects a polling session for one.
_WEBSOCKET_TYPES = frozenset("123456")
_POLLING_TYPES = frozenset({eio_packet.CLOSE, eio_packet.PONG, eio_packet.MESSAGE, eio_packet.UPGRADE})
_EVENTS = (sio_packet.EVENT, sio_packet.BINARY_EVENT)
_OTHER_SOCKETIO = (sio_packet.CONNECT, sio_packet.DISCONNECT, sio_packet.ACK, sio_packet.BINARY_ACK)
# Decoding attacker input fails in these ways (RecursionError: nesting deeper than Python's limit).
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, RecursionError)
_MAX_ADDRESSES = 1000
OTHER_ADDRESSES = "other addresses"


def websocket_frame_problem(event: dict) -> str | None:
    """Why a `websocket.receive` event is not an Engine.IO packet a client may send (None: it is).

    Binary frames are always Engine.IO messages (their Socket.IO content is checked later); a text
    frame must be a known packet type or a base64 message, as `engineio.packet.Packet.decode` reads it.
    """
    text = event.get("text")
    if text is None:
        return None
    if not text:
        return "empty Engine.IO packet"
    head = text[0]
    if head == "b":
        try:
            base64.b64decode(text[1:])
        except (binascii.Error, ValueError):
            return "invalid base64 Engine.IO packet"
        return None
    if head not in _WEBSOCKET_TYPES:
        return "unknown Engine.IO packet type"
    return None


def polling_payload_problem(body: bytes) -> str | None:
    """Why a long-polling POST body is not a payload of client packets (None: it is).

    Upstream decodes the body inside its request handler: a decoding error is logged with a traceback,
    and an OPEN or unknown packet type makes it disconnect the session and hang (see replier.outbox.server).
    """
    try:
        packets = eio_payload.Payload(encoded_payload=body.decode("utf-8")).packets
    except DECODE_ERRORS:
        return "undecodable polling payload"
    if any(pkt.packet_type not in _POLLING_TYPES for pkt in packets):
        return "unexpected Engine.IO packet type"
    return None


def socketio_packet_problem(pkt: sio_packet.Packet) -> str | None:
    """Why a decoded Socket.IO packet cannot be dispatched (None: it can).

    Upstream indexes an event's data for its name, so `42`, `42[]` or `42{}` raise inside the dispatch.
    """
    kind = pkt.packet_type
    if kind in _EVENTS:
        data = pkt.data
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            return "Socket.IO event without a name"
    elif kind not in _OTHER_SOCKETIO:
        return "unexpected Socket.IO packet type"
    if kind in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK) and not pkt.attachment_count:
        return "Socket.IO binary packet without attachments"
    return None


class MalformedFrames:
    """Counts ignored frames per client address; one WARNING line per address and interval.

    The first frame of a quiet period starts the interval; its end (or `flush()` at shutdown) writes
    the lines. At most `_MAX_ADDRESSES` addresses are told apart per interval, the rest are summed.
    Frame contents are never logged (they are the sender's, and may be anything).
    """

    def __init__(self, interval: float, counter=None) -> None:
        self.interval = interval
        self.counter = counter
        self._counts: dict[str, list] = {}
        self._handle: asyncio.TimerHandle | None = None

    def note(self, address: str, what: str) -> None:
        if self.counter is not None:
            self.counter.inc()
        entry = self._counts.get(address)
        if entry is None:
            if len(self._counts) >= _MAX_ADDRESSES:
                address = OTHER_ADDRESSES
                entry = self._counts.get(address)
            if entry is None:
                entry = self._counts[address] = [0, what]
        entry[0] += 1
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        counts, self._counts = self._counts, {}
        for address, (count, what) in counts.items():
            log.warning(
                "ignored %d malformed frame%s from %s in the last %g s (first: %s)",
                count,
                "" if count == 1 else "s",
                address,
                self.interval,
                what,
            )
