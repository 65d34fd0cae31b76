"""An in-process sliding-window limiter for logins and registrations.

The routes use three of them (configurator/api/routes/auth.py): failed logins per account, failed
logins per client address, and registrations per client address. Keys are any hashable value.

The state is "safe to lose": a restart or another configurator process starts counting
afresh, which only makes the limit looser, never lets anyone in. This is the limiter without
REDIS_URL: with several processes behind a load balancer the effective limit is then per process.
With REDIS_URL the routes get `configurator.core.redis_limits.RedisSlidingWindowLimiter` (same
interface, `Limiter`), counted in Redis for every worker and host, and this class as its fallback.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Protocol


class Limiter(Protocol):
    """What the routes use of a limiter (in this process, or in Redis)."""

    def retry_after(self, key: Hashable) -> int | None: ...
    def acquire(self, key: Hashable) -> int | None: ...
    def hit(self, key: Hashable) -> None: ...
    def reset(self, key: Hashable) -> None: ...


class SlidingWindowLimiter:
    def __init__(
        self,
        limit: int,
        window_seconds: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_keys = max_keys
        self._clock = clock
        self._hits: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _prune(self, key: Hashable, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def _wait(self, hits: deque[float] | None, now: float) -> int | None:
        if hits is None or len(hits) < self.limit:
            return None
        return max(1, math.ceil(hits[0] + self.window - now))

    def _record(self, key: Hashable, hits: deque[float] | None, now: float) -> None:
        if hits is None:
            hits = self._hits[key] = deque()
        hits.append(now)
        self._hits.move_to_end(key)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)

    def retry_after(self, key: Hashable) -> int | None:
        """Seconds until another attempt is allowed, or None when one is allowed now."""
        with self._lock:
            now = self._clock()
            return self._wait(self._prune(key, now), now)

    def acquire(self, key: Hashable) -> int | None:
        """Record an attempt if one is allowed now (None), else return the seconds to wait.

        Checking and recording happen under one lock, so attempts made in parallel cannot all pass a
        check that ran before any of them was recorded (`retry_after` then `hit` would let them).
        """
        with self._lock:
            now = self._clock()
            hits = self._prune(key, now)
            wait = self._wait(hits, now)
            if wait is None:
                self._record(key, hits, now)
            return wait

    def hit(self, key: Hashable) -> None:
        """Record one attempt (e.g. a failed login) whatever the count."""
        with self._lock:
            now = self._clock()
            self._record(key, self._prune(key, now), now)

    def reset(self, key: Hashable) -> None:
        with self._lock:
            self._hits.pop(key, None)
