"""Change signals between processes: the configurator says "this key / agent / tenant changed", every
replier hears it at once through Redis pub/sub (REDIS_URL) and re-checks that tenant's state.

Why a signal and not the data: a signal is a hint to re-read the database, which stays the only
authority. So an event carries ids only (no secret, no setting), a lost event costs nothing but
latency (each replier's periodic database check is the fallback), and a forged event can only make a
replier re-check what the database already says. Every event names its tenant, so a replier re-checks
that tenant's connections only.

One channel per deployment: `<REDIS_PREFIX>:signals`. Unset REDIS_URL: `NullPublisher`, nothing sent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

log = logging.getLogger("maitenant.signals")

Kind = Literal["key", "agent", "tenant"]
KINDS: frozenset[str] = frozenset({"key", "agent", "tenant"})
MAX_ID_CHARS = 64
MAX_EVENT_BYTES = 1024


def signals_channel(prefix: str) -> str:
    """The pub/sub channel of a deployment's change signals."""
    return f"{prefix}:signals"


def socketio_channel(prefix: str) -> str:
    """The pub/sub channel python-socketio's Redis manager uses for a deployment's repliers."""
    return f"{prefix}:socketio"


@dataclass(frozen=True, slots=True)
class Signal:
    """`kind` changed in `tenant_id`: a key (`key_id`), an agent (`agent_id`) or the tenant itself."""

    kind: Kind
    tenant_id: str
    key_id: str | None = None
    agent_id: str | None = None

    def encode(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))


class BadSignal(ValueError):
    """A message on the signals channel that is not a well-formed `Signal` (it is dropped)."""


def _an_id(data: dict, name: str, required: bool) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise BadSignal(f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def decode(raw: bytes | str) -> Signal:
    """The `Signal` in a pub/sub message; `BadSignal` for anything else (whoever can publish on the
    channel must not be able to crash a replier's listener)."""
    if len(raw) > MAX_EVENT_BYTES:
        raise BadSignal("signal too large")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSignal("signal is not JSON") from exc
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise BadSignal("signal without a known kind")
    kind = data["kind"]
    return Signal(
        kind=kind,
        tenant_id=_an_id(data, "tenant_id", True),
        key_id=_an_id(data, "key_id", kind == "key"),
        agent_id=_an_id(data, "agent_id", kind == "agent"),
    )


class Publisher(Protocol):
    def publish(self, signal: Signal) -> None: ...


class NullPublisher:
    """No REDIS_URL: one process, whose repliers find changes by their periodic check."""

    def publish(self, signal: Signal) -> None:
        return None


class RedisPublisher:
    """Publishes on `<prefix>:signals` with a blocking client (the configurator's routes run in threads).

    A failed publish is logged (without the URL, which may hold a password) and not raised: the
    change is already committed, and the repliers' periodic database check will find it.
    """

    def __init__(self, url: str, prefix: str, *, timeout: float = 1.0) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.channel = signals_channel(prefix)

    def publish(self, signal: Signal) -> None:
        try:
            self._client.publish(self.channel, signal.encode())
        except self._errors as exc:
            log.warning(
                "could not publish a %s change of tenant %s to Redis (%s); repliers will see it at their "
                "next periodic check",
                signal.kind,
                signal.tenant_id,
                type(exc).__name__,
            )

    def close(self) -> None:
        self._client.close()


def publisher(url: str, prefix: str) -> RedisPublisher | NullPublisher:
    """The publisher for these settings: Redis when `url` is set, else one that does nothing."""
    return RedisPublisher(url, prefix) if url else NullPublisher()
