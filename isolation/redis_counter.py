"""The fixed-window counter in Redis (REDIS_URL): every replier and configurator worker of a deployment
counts a tenant's messages and requests in one place, so a limit of N is N in total, not N per process.

Same semantics as `isolation.limits.FixedWindowCounter` (the callers do not know which one they
have): windows aligned to the epoch, `take` is check-and-count in one step, refused calls count
nothing. Each call is one Lua script, so the checks and the increments of a `take` are atomic across
every process: two messages on two repliers cannot both pass a check made before either was counted.
The window is Redis's own clock (`TIME`), so processes on hosts with skewed clocks agree on it.

A count lives at `<prefix>:window:<key parts joined by ":">:<window start in ms>` and expires one
second after its window ends (keys are tenant and agent ids: no secret). The script builds that name
from the key it is given plus the window start it reads from `TIME`; that is fine on a single Redis
server (what the deployment uses), not on Redis Cluster.

When Redis fails (down, timeout) the call is counted in an in-process `FixedWindowCounter` instead,
with one WARNING per outage and an INFO line when Redis answers again: availability first. The
limit stays enforced, per process, during the outage (with N processes a tenant may get up to N
times it), rather than failing open (no limit) or closed (nobody may send). While Redis is failing
it is tried again at most every `RETRY_SECONDS`, so an unreachable server does not add its timeout
to every message. Counts made in the fallback are not copied to Redis afterwards.

Two front ends: `RedisWindowCounter` (blocking client; the configurator's request checks run in its
worker threads) and `AsyncRedisWindowCounter` (redis.asyncio; the replier's message checks run on its
event loop, which must never block on a network call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable

import redis
import redis.asyncio as aioredis

from isolation.limits import FixedWindowCounter, Refusal

log = logging.getLogger("maitenant.limits")

RETRY_SECONDS = 1.0  # during an outage, Redis is tried again at most this often
TIMEOUT_SECONDS = 0.5  # a count is one loopback round trip (0.25-0.3 ms measured under load); this bounds a hung server

# KEYS: one base name per check. ARGV[1]: window (ms), ARGV[2]: amount, ARGV[2 + i]: limit of KEYS[i]
# (0 = unlimited). Returns {refused check (0-based) or -1, ms until the window ends, the first key's
# count after the call}. amount 0 with no limits reads the count; with limit 0 an amount always counts.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local start = now - (now % window)
local left = start + window - now
local names = {}
for i = 1, #KEYS do
  names[i] = KEYS[i] .. ':' .. start
  local limit = tonumber(ARGV[2 + i])
  if limit > 0 and tonumber(redis.call('GET', names[i]) or '0') + amount > limit then
    return {i - 1, left, 0}
  end
end
local value = tonumber(redis.call('GET', names[1]) or '0')
if amount > 0 then
  for i = 1, #KEYS do
    local counted = redis.call('INCRBY', names[i], amount)
    if i == 1 then value = counted end
    redis.call('PEXPIRE', names[i], left + 1000)
  end
end
return {-1, left, value}
"""

_ERRORS = (redis.RedisError, OSError)


class _Outage:
    """When Redis last failed, and the one WARNING per outage (of one counter; a process has one)."""

    def __init__(self) -> None:
        self.failed_at: float | None = None
        self._lock = threading.Lock()

    def skip(self) -> bool:
        """Whether to count in the fallback without trying Redis (it failed less than RETRY_SECONDS ago)."""
        failed_at = self.failed_at
        return failed_at is not None and time.monotonic() - failed_at < RETRY_SECONDS

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self.failed_at is None
            self.failed_at = time.monotonic()
        if first:
            log.warning(
                "tenant limits: Redis failed (%s); counting in this process until it answers again "
                "(each process enforces the limits on its own meanwhile)",
                type(exc).__name__,
            )

    def answered(self) -> None:
        if self.failed_at is None:
            return
        with self._lock:
            was_down, self.failed_at = self.failed_at is not None, None
        if was_down:  # only one thread of a process says it
            log.info("tenant limits: Redis answers again; counting there")


class _Base:
    def __init__(self, prefix: str, fallback: FixedWindowCounter | None) -> None:
        self._namespace = f"{prefix}:window:"
        self.fallback = fallback if fallback is not None else FixedWindowCounter()
        self.outage = _Outage()

    def name(self, key: Hashable) -> str:
        """The Redis key of `key` (a tuple of ids, or one id), without the window start."""
        parts = key if isinstance(key, tuple) else (key,)
        return self._namespace + ":".join(str(part) for part in parts)

    def _args(self, keys: list[Hashable], window: float, amount: int, limits: list[int]) -> dict:
        window_ms = max(1, round(window * 1000))
        return {"keys": [self.name(k) for k in keys], "args": [window_ms, amount, *limits]}

    @staticmethod
    def _refusal(answer: list) -> Refusal | None:
        index, left_ms = int(answer[0]), int(answer[1])
        return None if index < 0 else Refusal(index, max(left_ms / 1000, 0.001))


class RedisWindowCounter(_Base):
    """A `WindowCounter` in Redis with a blocking client (call it from worker threads, not the loop)."""

    def __init__(self, client: redis.Redis, prefix: str, fallback: FixedWindowCounter | None = None) -> None:
        super().__init__(prefix, fallback)
        self._script = client.register_script(_SCRIPT)

    def _run(self, keys: list[Hashable], window: float, amount: int, limits: list[int]) -> list | None:
        if self.outage.skip():
            return None
        try:
            answer = self._script(**self._args(keys, window, amount, limits))
        except _ERRORS as exc:
            self.outage.failed(exc)
            return None
        self.outage.answered()
        return answer

    def take(self, checks: list[tuple[Hashable, int]], window: float, amount: int = 1) -> Refusal | None:
        answer = self._run([k for k, _ in checks], window, amount, [int(limit) for _, limit in checks])
        if answer is None:
            return self.fallback.take(checks, window, amount)
        return self._refusal(answer)

    def add(self, key: Hashable, window: float, amount: int) -> int:
        answer = self._run([key], window, amount, [0])
        return self.fallback.add(key, window, amount) if answer is None else int(answer[2])

    def count(self, key: Hashable, window: float) -> int:
        answer = self._run([key], window, 0, [0])
        return self.fallback.count(key, window) if answer is None else int(answer[2])


class AsyncRedisWindowCounter(_Base):
    """The same counter for an event loop (redis.asyncio): `take`, `add` and `count` are awaited."""

    def __init__(self, client: aioredis.Redis, prefix: str, fallback: FixedWindowCounter | None = None) -> None:
        super().__init__(prefix, fallback)
        self._client = client
        self._script = client.register_script(_SCRIPT)

    async def _run(self, keys: list[Hashable], window: float, amount: int, limits: list[int]) -> list | None:
        if self.outage.skip():
            return None
        try:
            answer = await self._script(**self._args(keys, window, amount, limits))
        except _ERRORS as exc:
            self.outage.failed(exc)
            return None
        self.outage.answered()
        return answer

    async def take(self, checks: list[tuple[Hashable, int]], window: float, amount: int = 1) -> Refusal | None:
        answer = await self._run([k for k, _ in checks], window, amount, [int(limit) for _, limit in checks])
        if answer is None:
            return self.fallback.take(checks, window, amount)
        return self._refusal(answer)

    async def add(self, key: Hashable, window: float, amount: int) -> int:
        answer = await self._run([key], window, amount, [0])
        return self.fallback.add(key, window, amount) if answer is None else int(answer[2])

    async def count(self, key: Hashable, window: float) -> int:
        answer = await self._run([key], window, 0, [0])
        return self.fallback.count(key, window) if answer is None else int(answer[2])

    async def aclose(self) -> None:
        await self._client.aclose()


def async_client(url: str, timeout: float = TIMEOUT_SECONDS) -> aioredis.Redis:
    """The replier's client for limits: short timeouts, since a message waits for its count."""
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
