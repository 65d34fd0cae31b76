"""One replier at a time answers a chat stream (REDIS_URL), in the order its messages arrived.

Within one replier, `replier.streams` answers a stream's messages one after another. With several
repliers, two connections of one agent can sit on different instances and both speak in one stream
(two adapters in one group); each instance would answer its own message at once, each without the
other's exchange in its context, and the stored rows would interleave (in, in, out, out). A Redis
lock per stream (keyed by tenant, agent, platform and stream) makes the answers one after another:
an instance takes it before it ingests a message and gives it back once the reply is stored.

A plain lock is not enough for order: when its holder gives it back, whichever instance polls first
would take it, so a message could be answered before one that arrived earlier on the other instance
(and without it in its context). So the lock has a wait queue: a Redis sorted set of the waiting
messages scored by their arrival time, and only the queue's head may take the lock. An instance that
gives the lock back enters its own next message in the same script, so it cannot lose its turn in
the gap before it asks again. Waiters refresh a "seen" time at every poll; a waiter not seen for
`STALE_WAITER_SECONDS` (its replier died) is dropped from the head, and one that was only slow
enters the queue again, with its own arrival time, at its next poll. Arrival times are the
repliers' clocks: across hosts, order holds to within their clock skew.

The lock expires after `ttl` (one LLM call with its retries, plus a margin), so a replier that dies
holding it delays the stream, never blocks it; a waiter that sees no progress at all (neither the
queue's head nor the lock changing hands) for `ttl` answers anyway. Whoever answered a stream last
is remembered: an instance that takes over a stream answered elsewhere drops its cached history and
memories of it, so the next answer reads what the other instance stored. When Redis fails, the
message is answered without the lock (as one replier alone would), with one WARNING per outage:
availability first, and the database still stores every message exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from replier.connections import StreamKey

log = logging.getLogger("replier")

POLL_SECONDS = 0.01
WARN_SECONDS = 60.0
LAST_OWNER_SECONDS = 3600
STALE_WAITER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Turn:
    """One message's place in its stream's wait queue: a token naming it, and when it arrived."""

    arrived: float = field(default_factory=time.time)
    token: str = field(default_factory=lambda: secrets.token_hex(8))


def _no_next() -> Turn | None:
    return None


def _nothing() -> None:
    return None


# KEYS: lock, last owner, queue, seen. ARGV: token, ttl ms, arrival score, stale ms, keys' ttl ms.
# Returns {1, last owner ("" if none)} when taken, else {0, the queue's head, the lock's holder}.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], now)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
while head and head ~= ARGV[1] do
  local seen = tonumber(redis.call('HGET', KEYS[4], head) or '0')
  if now - seen <= tonumber(ARGV[4]) then break end
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[4], head)
  head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
end
if head == ARGV[1] and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  return {1, redis.call('GET', KEYS[2]) or ''}
end
return {0, head or '', redis.call('GET', KEYS[1]) or ''}
"""
# KEYS: lock, last owner, queue, seen. ARGV: token, owner name, owner ttl s, [next token, next score].
# Gives the lock back and enters this instance's next message of the stream (if any) in the queue.
_GIVE = """
if ARGV[4] then
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[4], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
# KEYS: queue, seen. ARGV: token. A waiter that gives up (an error, a cancelled task) leaves the queue.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class NoStreamLocks:
    """One replier (no REDIS_URL): its own per-stream queues already keep the order."""

    @asynccontextmanager
    async def hold(
        self,
        key: StreamKey,
        turn: Turn | None = None,
        following: Callable[[], Turn | None] = _no_next,
        on_wait: Callable[[], None] = _nothing,
    ) -> AsyncIterator[bool]:
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
        self._leave = self._client.register_script(_LEAVE)
        self._warned_at = -math.inf
        self.waits = 0  # times a stream was held by another instance when this one wanted it

    def _keys(self, key: StreamKey) -> list[str]:
        tenant_id, agent_id, platform, stream = key
        tail = hashlib.sha256(f"{platform}\0{stream}".encode()).hexdigest()[:32]
        base = f"{self._prefix}:{tenant_id}:{agent_id}:{tail}"
        return [f"{base}:lock", f"{base}:last", f"{base}:queue", f"{base}:seen"]

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_SECONDS:
            self._warned_at = now
            log.warning("stream locks: Redis failed (%s); answering without cross-instance order", type(exc).__name__)

    @asynccontextmanager
    async def hold(
        self,
        key: StreamKey,
        turn: Turn | None = None,
        following: Callable[[], Turn | None] = _no_next,
        on_wait: Callable[[], None] = _nothing,
    ) -> AsyncIterator[bool]:
        """Hold the stream's lock while the body runs, taken in `turn` (the message's place in the
        wait queue); yields whether another instance answered the stream last (the caller's cached
        context of it is stale). `following` names this instance's next message of the stream when
        the lock is given back (None: there is none), so that it keeps its place in the queue.
        `on_wait` runs once, when the lock is not free at the first attempt (the caller stores the
        message then, so that it is acknowledged without waiting for the other instance's answer)."""
        keys = self._keys(key)
        turn = turn or Turn()
        token = f"{self.owner}:{turn.token}"
        ttl_ms = max(1, int(self.ttl * 1000))
        args = [token, ttl_ms, repr(turn.arrived), int(STALE_WAITER_SECONDS * 1000), LAST_OWNER_SECONDS * 1000]
        deadline = time.monotonic() + self.ttl
        progress: tuple | None = None
        last: str | None = None
        waited = False
        task = asyncio.current_task()
        try:
            while True:
                taken = await self._take(keys=keys, args=args)
                if int(taken[0]) == 1:
                    last = taken[1].decode() if isinstance(taken[1], bytes) else str(taken[1])
                if task is not None and task.cancelling():
                    # Cancelled while the script ran: redis-py may swallow the CancelledError (it
                    # drops the connection instead), and the loop would wait on until `ttl`.
                    raise asyncio.CancelledError
                if last is not None:
                    break
                if not waited:
                    waited = True
                    self.waits += 1
                    on_wait()
                if tuple(taken[1:]) != progress:  # the queue moved or the lock changed hands
                    progress = tuple(taken[1:])
                    deadline = time.monotonic() + self.ttl
                elif time.monotonic() >= deadline:
                    break  # nothing moved for a whole lock's lifetime: answer anyway
                await asyncio.sleep(POLL_SECONDS)
        except (redis.RedisError, OSError) as exc:
            self._warn(exc)
            yield False
            return
        except BaseException:  # cancelled while waiting (shutdown): leave the queue on the way out
            await self._leave_queue(keys, token)
            if last is not None:  # taken just as the cancellation came: give it back at once
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._give(keys=keys, args=[token, self.owner, LAST_OWNER_SECONDS])
            raise
        if last is None:
            await self._leave_queue(keys, token)
        try:
            yield bool(last) and last != self.owner
        finally:
            give = [token, self.owner, LAST_OWNER_SECONDS]
            upcoming = following()
            if upcoming is not None:
                give += [f"{self.owner}:{upcoming.token}", repr(upcoming.arrived)]
            try:
                await self._give(keys=keys, args=give)
            except (redis.RedisError, OSError) as exc:
                self._warn(exc)  # the lock expires by itself after `ttl`

    async def _leave_queue(self, keys: list[str], token: str) -> None:
        try:
            await self._leave(keys=keys[2:], args=[token])
        except (redis.RedisError, OSError) as exc:
            self._warn(exc)  # the entry is dropped as stale by the next waiter

    async def aclose(self) -> None:
        await self._client.aclose()
