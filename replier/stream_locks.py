"""One replier at a time answers a chat stream (REDIS_URL): per-stream order across instances.

Within one replier, `replier.streams` answers a stream's messages one after another. With several
repliers, two connections of one agent can sit on different instances and both speak in one stream
(two adapters in one group); each instance would answer its own message at once, each without the
other's exchange in its context, and the stored rows would interleave (in, in, out, out). A Redis
lock per stream (keyed by tenant, agent, platform and stream) makes the answers one after another:
an instance takes it before it ingests a message and gives it back once the reply is stored.

The lock expires after `ttl` (one LLM call with its retries, plus a margin), so a replier that dies
holding it delays the stream, never blocks it. Whoever answered a stream last is remembered: an
instance that takes over a stream answered elsewhere drops its cached history and memories of it,
so the next answer reads what the other instance stored. When Redis fails, the message is answered
without the lock (as one replier alone would), with one WARNING per outage: availability first,
and the database still stores every message exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis

from replier.connections import StreamKey

log = logging.getLogger("replier")

POLL_SECONDS = 0.01
WARN_SECONDS = 60.0
LAST_OWNER_SECONDS = 3600

# KEYS: lock, last owner. ARGV: token, ttl ms. Returns the last owner ("" if none) when taken, else nil.
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('GET', KEYS[2]) or ''
end
return false
"""
# KEYS: lock, last owner. ARGV: token, owner name, owner ttl s.
_GIVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""


class NoStreamLocks:
    """One replier (no REDIS_URL): its own per-stream queues already keep the order."""

    @asynccontextmanager
    async def hold(self, key: StreamKey) -> AsyncIterator[bool]:
        yield False

    async def aclose(self) -> None:
        return None


class StreamLocks:
    def __init__(self, url: str, prefix: str, owner: str, ttl: float) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._prefix = f"{prefix}:stream"
        self.owner = owner or f"replier-{secrets.token_hex(4)}"
        self.ttl = ttl
        self._take = self._client.register_script(_TAKE)
        self._give = self._client.register_script(_GIVE)
        self._warned_at = -math.inf
        self.waits = 0  # times a stream was held by another instance when this one wanted it

    def _keys(self, key: StreamKey) -> list[str]:
        tenant_id, agent_id, platform, stream = key
        tail = hashlib.sha256(f"{platform}\0{stream}".encode()).hexdigest()[:32]
        base = f"{self._prefix}:{tenant_id}:{agent_id}:{tail}"
        return [f"{base}:lock", f"{base}:last"]

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_SECONDS:
            self._warned_at = now
            log.warning("stream locks: Redis failed (%s); answering without cross-instance order", type(exc).__name__)

    @asynccontextmanager
    async def hold(self, key: StreamKey) -> AsyncIterator[bool]:
        """Hold the stream's lock while the body runs; yields whether another instance answered
        the stream last (the caller's cached context of it is stale)."""
        keys = self._keys(key)
        token = f"{self.owner}:{secrets.token_hex(8)}"
        ttl_ms = max(1, int(self.ttl * 1000))
        deadline = time.monotonic() + self.ttl
        last: str | None = None
        waited = False
        try:
            while True:
                taken = await self._take(keys=keys, args=[token, ttl_ms])
                if taken is not None:
                    last = taken.decode() if isinstance(taken, bytes) else str(taken)
                    break
                if not waited:
                    waited = True
                    self.waits += 1
                if time.monotonic() >= deadline:
                    break  # the holder outlived the lock's own expiry: answer anyway
                await asyncio.sleep(POLL_SECONDS)
        except (redis.RedisError, OSError) as exc:
            self._warn(exc)
            yield False
            return
        try:
            yield bool(last) and last != self.owner
        finally:
            try:
                await self._give(keys=keys, args=[token, self.owner, LAST_OWNER_SECONDS])
            except (redis.RedisError, OSError) as exc:
                self._warn(exc)  # the lock expires by itself after `ttl`

    async def aclose(self) -> None:
        await self._client.aclose()
