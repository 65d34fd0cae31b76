"""The replier's layering rule: only the outbox touches python-socketio / python-engineio.

Rule: no module under `replier/` other than those in `replier/outbox/` imports `socketio` or
`engineio` (in any form: `import`, `from ... import`, `importlib.import_module`, `__import__`).
Everything the replier says to a client goes through `replier.outbox.Outbox`, which uses the
libraries' public API only: no Engine.IO sends, no manager internals, no hand-built packets. The
outbox's server module may subclass the servers (upstream bug fixes, see its docstring); the `Outbox`
itself may not reach behind `AsyncServer`'s public methods.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import socketio

from replier.outbox.serializer import JsonPacket, OrjsonModule
from replier.outbox.server import InlineManager

ROOT = Path(__file__).resolve().parents[2]
REPLIER = ROOT / "replier"
OUTBOX = REPLIER / "outbox"
LIBRARIES = ("socketio", "engineio")
# Engine.IO / manager internals that a sender could be tempted to use for speed.
INTERNALS = {"eio", "manager", "packet_class", "send_packet", "eio_sid_from_sid", "_send_packet", "_send_eio_packet"}


def _is_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARIES)


def library_imports(source: str) -> list[str]:
    """Every import of python-socketio or python-engineio in a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_library(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_library(node.module or ""):
                found.append(node.module)
        elif (
            isinstance(node, ast.Call)
            and (node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", ""))
            in {"__import__", "import_module"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and _is_library(str(node.args[0].value))
        ):
            found.append(str(node.args[0].value))
    return found


def internals_used(source: str) -> list[str]:
    """Attributes of the Socket.IO server's internals, and private attributes of anything but `self`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
        if node.attr in INTERNALS or (node.attr.startswith("_") and not node.attr.startswith("__") and not on_self):
            found.append(node.attr)
    return found


def test_the_detectors_catch_every_form():
    assert library_imports("import socketio")
    assert library_imports("import engineio.packet as p")
    assert library_imports("from socketio import packet")
    assert library_imports("from engineio.payload import Payload")
    assert library_imports("import importlib; importlib.import_module('socketio')")
    assert library_imports("__import__('engineio')")
    assert not library_imports("import socketiox\nfrom replier.outbox import Outbox\nfrom . import socketio")
    assert internals_used("await self._sio.eio.send_packet(sid, pkt)") == ["send_packet", "eio"]
    assert internals_used("self._sio.manager.eio_sid_from_sid(sid, '/')") == ["eio_sid_from_sid", "manager"]
    assert internals_used("await self._sio._send_packet(sid, pkt)") == ["_send_packet"]
    assert internals_used("await self._sio.emit('message', data, to=sid)") == []


def test_only_the_outbox_imports_socketio_or_engineio():
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in sorted(REPLIER.rglob("*.py"))
        if OUTBOX not in path.parents and (hits := library_imports(path.read_text()))
    }
    assert offenders == {}, f"only replier/outbox/ may import socketio or engineio: {offenders}"
    assert any(library_imports(path.read_text()) for path in OUTBOX.glob("*.py"))  # the rule is not vacuous


def test_the_outbox_sends_through_the_public_api_only():
    assert internals_used((OUTBOX / "send.py").read_text()) == []


class _RecordingSocket:
    """An Engine.IO socket stand-in that records the packets sent to it."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, pkt) -> None:
        self.sent.append(pkt.encode())


def test_the_inline_manager_sends_what_upstream_sends():
    """One recipient: the same Engine.IO packet as upstream's manager, without its task. Several
    recipients, a callback or nobody: upstream's own path."""

    async def sent_by(manager) -> list[list[str]]:
        sio = socketio.AsyncServer(async_mode="asgi", serializer=JsonPacket, json=OrjsonModule, client_manager=manager)
        sockets = [_RecordingSocket(), _RecordingSocket()]
        sids = []
        for n, sock in enumerate(sockets):
            sio.eio.sockets[f"eio-{n}"] = sock
            sids.append(await sio.manager.connect(f"eio-{n}", "/"))
        await sio.manager.enter_room(sids[0], "/", "both")
        await sio.manager.enter_room(sids[1], "/", "both")
        await sio.emit("message", {"text": "one", "n": [1, 2]}, to=sids[0])
        await sio.emit("message", ("two", "args"), to=sids[1])
        await sio.emit("message", None, to=sids[1])
        await sio.emit("message", {"text": "all"}, to="both")
        await sio.emit("message", {"text": "nobody"}, to="no-such-sid")
        return [sock.sent for sock in sockets]

    upstream = asyncio.run(sent_by(socketio.AsyncManager()))
    inline = asyncio.run(sent_by(InlineManager()))
    assert inline == upstream
    assert upstream[0] == ['42["message",{"text":"one","n":[1,2]}]', '42["message",{"text":"all"}]']
