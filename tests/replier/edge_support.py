"""Raw Engine.IO clients for the pre-authentication tests: HTTP long-polling over plain sockets and
httpx, websockets through websocket-client, so a test can send exactly the bytes an attacker would."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator

import httpx
import websocket
from replier_support import ReplierProcess

EIO = "EIO=4&transport=polling"


@contextlib.contextmanager
def serving(provisioned, **env: str) -> Iterator[ReplierProcess]:
    """A replier of its own with these settings (FORWARDED_ALLOW_IPS unset unless given)."""
    env.setdefault("FORWARDED_ALLOW_IPS", "")
    server = ReplierProcess(provisioned.url, provisioned.app_role, **env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Sets the limit, then becomes `python -m replier` (same pid). Not preexec_fn: unsafe with threads.
_LIMITED = (
    "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'replier'])"
)


class LimitedReplier(ReplierProcess):
    """`python -m replier` under RLIMIT_NOFILE = `nofile`, soft and hard (raise_nofile_limit lifts the
    soft limit to the hard one)."""

    def __init__(self, *args, nofile: int, **env: str) -> None:
        super().__init__(*args, **env)
        self.nofile = nofile
        self.cmd = [sys.executable, "-c", _LIMITED, str(nofile)]

    def fds(self) -> int:
        assert self.process is not None
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def health(server: ReplierProcess) -> dict:
    return httpx.get(f"{server.http}/health", timeout=10).json()


def metric(server: ReplierProcess, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


# -- long-polling ------------------------------------------------------------------------------
def polling_handshake(client: httpx.Client, server: ReplierProcess, **headers: str) -> httpx.Response:
    return client.get(f"{server.http}/ws/?{EIO}", headers=headers)


def open_polling(client: httpx.Client, server: ReplierProcess, **headers: str) -> str:
    """A polling session's sid (asserting the handshake was accepted)."""
    response = polling_handshake(client, server, **headers)
    assert response.status_code == 200, response.text
    assert response.text.startswith("0{")
    return json.loads(response.text[1:])["sid"]


def raw_request(port: int, head: str | bytes, body: bytes = b"", *, read: bool = True, timeout: float = 10.0) -> bytes:
    """Send a request over a fresh socket; the whole answer (until the server closes) or b"" unread.

    A reset after the answer counts as its end (the server may close with our body still unread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before all of it is sent
            sock.sendall((head if isinstance(head, bytes) else head.encode()) + b"\r\n" + body)
        if not read:
            return b""
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


def post_head(sid: str, *, length: int | None, extra: str = "") -> str:
    declared = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST /ws/?{EIO}&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain; charset=UTF-8\r\n{declared}{extra}"
    )


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


# -- websocket ---------------------------------------------------------------------------------
def ws_url(server: ReplierProcess, sid: str | None = None) -> str:
    url = f"ws://127.0.0.1:{server.port}/ws/?EIO=4&transport=websocket"
    return url + (f"&sid={sid}" if sid else "")


def open_websocket(server: ReplierProcess, headers: list[str] | None = None) -> websocket.WebSocket:
    """An Engine.IO websocket session (OPEN received), not yet a Socket.IO connection."""
    ws = websocket.create_connection(ws_url(server), header=headers or [], timeout=10)
    opening = ws.recv()
    assert opening.startswith("0{"), opening
    return ws


def refused_websocket(server: ReplierProcess, headers: list[str] | None = None) -> int:
    """The HTTP status a refused websocket handshake got."""
    try:
        ws = websocket.create_connection(ws_url(server), header=headers or [], timeout=10)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    ws.close()
    raise AssertionError("the websocket handshake was accepted")


def socketio_connect(ws: websocket.WebSocket) -> str:
    """Send the Socket.IO CONNECT; the answer ('40{...}' accepted, '44{...}' refused)."""
    ws.send("40")
    return ws.recv()


def close_frame(ws: websocket.WebSocket, timeout: float = 20.0) -> tuple[int, str]:
    """Read frames until the server's close frame; its (code, reason). Raw frames: no automatic close
    reply, which could meet a connection the server already dropped."""
    ws.settimeout(timeout)
    while True:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()
