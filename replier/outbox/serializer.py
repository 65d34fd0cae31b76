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
