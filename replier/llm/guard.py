"""The connect-time egress check for agents' LLM endpoints (SSRF defence).

A check when the agent is saved is not enough: a name that resolved to a public address then can
resolve to 127.0.0.1 or 169.254.169.254 now (DNS rebinding), and rows saved before the rules existed
were never checked. So every outbound connection of an agent's provider goes through
`GuardedBackend.connect_tcp`: the host is resolved once (through an injectable resolver), every
address is checked with `isolation.egress.check_address`, and the socket is opened to a checked
address, never to the name again, so no second resolution can differ. TLS still verifies the
certificate against the host name (httpcore passes the origin's host as `server_hostname`).

The backend is plugged into httpx through `guarded_transport`: httpx 0.28's `AsyncHTTPTransport` takes
no `network_backend`, so its connection pool is replaced by an `httpcore.AsyncConnectionPool` built
with one (the rest of the transport, request and response mapping and exception translation, is
httpx's own). Environment proxies are not used for these clients (a proxy would resolve the name
itself, after the check).
"""

from __future__ import annotations

import socket
import typing
from collections.abc import Awaitable, Callable

import anyio
import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream

from isolation.egress import EgressRefused, EgressSettings, check_address

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to for a TCP connection (the system resolver, off the event loop)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for _family, _type, _proto, _canon, sockaddr in infos))


class GuardedBackend(AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses `check_address` allows."""

    def __init__(
        self,
        policy: EgressSettings,
        *,
        resolver: Resolver | None = None,
        inner: AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver or system_resolver
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self.resolver(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:  # every answer is checked: one bad address refuses the host
            check_address(address, host, policy=self.policy)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise EgressRefused("LLM requests do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(
    policy: EgressSettings, *, limits: httpx.Limits, resolver: Resolver | None = None
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through `GuardedBackend`."""
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # see the module docstring
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(policy, resolver=resolver),
    )
    return transport


__all__ = ["EgressRefused", "GuardedBackend", "Resolver", "guarded_transport", "system_resolver"]
