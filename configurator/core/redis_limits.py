"""The login/register limits counted in Redis (REDIS_URL), so N configurator workers or hosts enforce
one limit instead of N.

Same interface and semantics as `configurator.core.ratelimit.SlidingWindowLimiter` (the routes do not
know which one they have): a sliding window per key, kept as a sorted set of attempt times. Each call
is one Lua script, so the prune, the count and the record are one atomic step across every process:
parallel attempts on different workers cannot all pass a check made before any of them was recorded.
Times are Redis's own clock (`TIME`), so workers on hosts with skewed clocks agree on the window.

Key names hold a SHA-256 of the limiter's key (an account id or a client address), not the value.

When Redis fails (down, timeout), the call falls back to an in-process `SlidingWindowLimiter` for that
call and a WARNING is logged (at most once per `FALLBACK_LOG_SECONDS`): the limit stays enforced,
per process, instead of failing open (every attempt allowed) or closed (nobody can sign in).
The calls block for a loopback round trip (~0.1 ms), bounded by `timeout`; they run on the event
loop like the in-process limiter's lock.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Hashable

import redis

from configurator.core.ratelimit import SlidingWindowLimiter

log = logging.getLogger("configurator")

FALLBACK_LOG_SECONDS = 60.0

# KEYS[1]: the window's sorted set. ARGV: window (ms), limit, mode, member suffix.
# mode: "acquire" (record only when allowed), "hit" (always record), "check" (never record).
# Returns the milliseconds until another attempt is allowed, or -1 when one is allowed now.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local mode = ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local wait = -1
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  wait = tonumber(oldest[2]) + window - now
  if wait < 1 then wait = 1 end
end
if mode == 'hit' or (mode == 'acquire' and wait < 0) then
  redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
return wait
"""


class RedisSlidingWindowLimiter:
    _warned_at = -math.inf  # one warning per interval for all the process's limiters (one outage)

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        name: str,
        limit: int,
        window_seconds: float,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self._client = client
        self._namespace = f"{prefix}:limit:{name}:"
        self._script = client.register_script(_SCRIPT)
        self._fallback = SlidingWindowLimiter(limit, window_seconds)

    def _key(self, key: Hashable) -> str:
        return self._namespace + hashlib.sha256(repr(key).encode()).hexdigest()

    def _call(self, key: Hashable, mode: str) -> int | bool | None:
        """The script's answer in seconds (None: allowed now), or False when Redis failed."""
        try:
            wait_ms = int(
                self._script(
                    keys=[self._key(key)],
                    args=[int(self.window * 1000), self.limit, mode, secrets.token_hex(6)],
                )
            )
        except (redis.RedisError, OSError) as exc:
            now = time.monotonic()
            if now - RedisSlidingWindowLimiter._warned_at >= FALLBACK_LOG_SECONDS:
                RedisSlidingWindowLimiter._warned_at = now
                log.warning(
                    "rate limits: Redis failed (%s); counting in this process until it answers again",
                    type(exc).__name__,
                )
            return False
        return None if wait_ms < 0 else max(1, math.ceil(wait_ms / 1000))

    def retry_after(self, key: Hashable) -> int | None:
        """Seconds until another attempt is allowed, or None when one is allowed now."""
        result = self._call(key, "check")
        return self._fallback.retry_after(key) if result is False else result

    def acquire(self, key: Hashable) -> int | None:
        """Record an attempt if one is allowed now (None), else return the seconds to wait (atomic)."""
        result = self._call(key, "acquire")
        return self._fallback.acquire(key) if result is False else result

    def hit(self, key: Hashable) -> None:
        """Record one attempt (e.g. a failed login) whatever the count."""
        if self._call(key, "hit") is False:
            self._fallback.hit(key)

    def reset(self, key: Hashable) -> None:
        self._fallback.reset(key)
        try:
            self._client.delete(self._key(key))
        except (redis.RedisError, OSError):
            return  # the window expires by itself; a later success resets it again


def limiter(
    client: redis.Redis | None, prefix: str, name: str, limit: int, window_seconds: float
) -> SlidingWindowLimiter | RedisSlidingWindowLimiter:
    """A limiter counted in Redis when there is a client (REDIS_URL), else in this process."""
    if client is None:
        return SlidingWindowLimiter(limit, window_seconds)
    return RedisSlidingWindowLimiter(client, prefix, name, limit, window_seconds)


def redis_client(url: str, timeout: float = 0.5) -> redis.Redis | None:
    """The configurator's Redis client for limits (None without REDIS_URL); short timeouts, since a
    call blocks the request that makes it."""
    if not url:
        return None
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
