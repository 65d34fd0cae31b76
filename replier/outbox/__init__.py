"""Everything the replier says to clients, and the only code that touches python-socketio / engine.io.

The rule (enforced by tests/replier/test_layers.py): no module of `replier/` outside this package
imports `socketio` or `engineio`. Inside it:

- `send`: the `Outbox`, through which every acknowledgement, reply, error, refusal and disconnect goes;
- `server`: the Socket.IO / Engine.IO servers (the session guard wired in, upstream bugs fixed) and
  the ASGI app around them;
- `frames`: recognising malformed Engine.IO / Socket.IO frames before the libraries decode them;
- `serializer`: the orjson packet class.

The rest of the replier hands the outbox protocol-level things (a connection, a reply) and never a
Socket.IO sid's internals, so the transport can change (e.g. a Redis manager) in this package alone.
"""

from replier.outbox.send import Outbox, Refused

__all__ = ["Outbox", "Refused"]
