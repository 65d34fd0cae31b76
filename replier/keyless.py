"""The keyless listener: an extra, opt-in socket whose connections speak with one configured API key.

MaiBot-Napcat-Adapter (and other adapters built on maim_message's legacy `Router`) connect with
`TargetConfig(token=None)`: they cannot send a key. An operator may serve them on an extra listener
(`KEYLESS_LISTEN=127.0.0.1:8000`) that stands for one API key (`KEYLESS_API_KEY_FILE`, or
`KEYLESS_API_KEY`). A connection accepted on that socket without a key is treated exactly as one that
presented the key: same lookup and cache, same tenant and agent, and the revocation check closes it
when the key is revoked, deleted or expires (new connections are then refused).

Which listener a connection came through is decided by the ASGI scope's `server`: uvicorn fills it
with the accepting socket's own address (`getsockname`), which a client cannot choose; no header or
query parameter is ever consulted. The listener is loopback-only unless `KEYLESS_ALLOW_REMOTE=true`:
anyone who can reach it speaks as that agent. The key is never logged; start-up logs at WARNING what
was bound and for which key id, tenant and agent.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from replier.core.config import ReplierSettings


class KeylessError(ValueError):
    """The keyless settings cannot be used (the message never contains the key)."""


@dataclass(frozen=True, slots=True)
class KeylessListener:
    """The bound keyless socket: its address as the ASGI scope reports it, and the key it stands for."""

    address: tuple[str, int]
    secret: str = field(repr=False)
    sock: socket.socket | None = field(default=None, repr=False, compare=False)

    def serves(self, scope: dict | None) -> bool:
        """Whether a connection with this ASGI scope was accepted by the keyless socket."""
        server = (scope or {}).get("server")
        return server is not None and len(server) >= 2 and (server[0], server[1]) == self.address


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8000`) into (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise KeylessError(f"KEYLESS_LISTEN must be host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(settings: ReplierSettings) -> str:
    """The key the listener stands for: from KEYLESS_API_KEY_FILE (owner-only) or KEYLESS_API_KEY."""
    if settings.keyless_api_key_file:
        path = Path(settings.keyless_api_key_file)
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeylessError(f"cannot read KEYLESS_API_KEY_FILE {str(path)!r}: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeylessError(f"KEYLESS_API_KEY_FILE {str(path)!r} must be readable by its owner only (chmod 600)")
        secret = text.strip()
    else:
        secret = settings.keyless_api_key.get_secret_value().strip()
    if not secret:
        raise KeylessError("KEYLESS_LISTEN needs the key it stands for: KEYLESS_API_KEY_FILE or KEYLESS_API_KEY")
    if not secret.startswith("mtk_"):
        raise KeylessError("the keyless listener's key must be an mtk_ API key")
    return secret


def bind(settings: ReplierSettings) -> KeylessListener | None:
    """Bind the keyless socket (None when KEYLESS_LISTEN is unset). `KeylessError` for a remote address
    without KEYLESS_ALLOW_REMOTE, a missing or unsafe key file, or a port that cannot be bound."""
    if not settings.keyless_listen.strip():
        return None
    host, port = parse_listen(settings.keyless_listen)
    if not _is_loopback(host) and not settings.keyless_allow_remote:
        raise KeylessError(
            f"KEYLESS_LISTEN {host}:{port} is not a loopback address: anyone who reaches it speaks as the key's "
            "agent; set KEYLESS_ALLOW_REMOTE=true to allow it"
        )
    secret = read_secret(settings)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise KeylessError(f"KEYLESS_LISTEN {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise KeylessError(f"cannot listen on KEYLESS_LISTEN {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    bound = sock.getsockname()
    return KeylessListener((bound[0], bound[1]), secret, sock)


def remove_from_environment() -> None:
    """Drop KEYLESS_API_KEY from this process's environment once read (child processes never see it)."""
    for name in list(os.environ):
        if name.upper() == "KEYLESS_API_KEY":
            del os.environ[name]
