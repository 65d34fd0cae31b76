"""Socket.IO serialisation tuned for the replier: orjson, and no recursive scan for binary data.

python-socketio's default packet walks every outgoing payload looking for `bytes` (to switch to a
binary event); the maim_message protocol is JSON only, so that walk is pure overhead on every emit.
"""

from __future__ import annotations

import orjson
from socketio import packet


class OrjsonModule:
    """The `json` interface python-socketio expects, backed by orjson."""

    @staticmethod
    def dumps(obj, *args, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(data, *args, **kwargs):
        return orjson.loads(data)


class JsonPacket(packet.Packet):
    uses_binary_events = False
    json = OrjsonModule


def _stand_in(value):
    """Binary attachments (a Socket.IO binary event) count with their length."""
    if isinstance(value, bytes):
        return "x" * len(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def encoded_size(data) -> int:
    """The size of `data` as JSON (what the client sent, give or take whitespace).

    Inbound data comes from orjson (JSON only) plus, for a binary event, `bytes` attachments; those
    are counted instead of making the size unknown (which used to let them past the size limit).
    """
    return len(orjson.dumps(data, default=_stand_in))
