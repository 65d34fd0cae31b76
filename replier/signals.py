"""The replier's ear for change signals (`isolation.signals`): a Redis subscription on
`<REDIS_PREFIX>:signals` that hands each well-formed signal to the replier at once.

Why: with several repliers behind a balancer, a key revoked through the configurator must close that
key's connections on every instance within a second, not at each instance's next periodic check. The
periodic check stays (it is the fallback while Redis is unreachable, and what one process without
Redis relies on). A dropped Redis connection is retried with a growing pause and logged once per
outage; after a reconnect the replier re-checks everything it holds, since signals published during
the outage were lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

from isolation.signals import BadSignal, Signal, decode, signals_channel

log = logging.getLogger("replier")

RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


class SignalListener:
    def __init__(
        self,
        url: str,
        prefix: str,
        on_signal: Callable[[Signal], Awaitable[object]],
        on_reconnect: Callable[[], Awaitable[object]],
    ) -> None:
        self._url = url
        self.channel = signals_channel(prefix)
        self._on_signal = on_signal
        self._on_reconnect = on_reconnect
        self.subscribed = asyncio.Event()  # set while subscribed (tests and /health wait for it)
        self.received = 0
        self.dropped = 0

    async def run(self) -> None:
        """Subscribe and dispatch until cancelled, reconnecting after Redis errors."""
        pause = RETRY_FIRST_SECONDS
        outage = False
        while True:
            client = aioredis.Redis.from_url(self._url, socket_connect_timeout=2.0)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed.set()
                    if outage:
                        log.info("signals: subscribed to Redis again; re-checking every open connection")
                        outage = False
                        await self._on_reconnect()
                    pause = RETRY_FIRST_SECONDS
                    async for message in pubsub.listen():
                        await self._dispatch(message)
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                if not outage:
                    log.warning(
                        "signals: Redis unreachable (%s); relying on the periodic check until it is back",
                        type(exc).__name__,
                    )
                    outage = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_SECONDS)
            finally:
                self.subscribed.clear()
                await client.aclose()

    async def _dispatch(self, message: dict) -> None:
        if message.get("type") != "message":
            return
        try:
            signal = decode(message["data"])
        except BadSignal as exc:
            self.dropped += 1
            log.warning("signals: dropped a malformed message on %s: %s", self.channel, exc)
            return
        self.received += 1
        try:
            await self._on_signal(signal)
        except Exception:
            # The replier's own failure (e.g. the database is down): the periodic check retries it.
            log.exception("signals: handling a %s change of tenant %s failed", signal.kind, signal.tenant_id)
