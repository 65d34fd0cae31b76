"""Per-tenant limits: what they are, what a tenant's effective limits are, and how they are counted.

Five limits, each with a default from the settings (`isolation.config.BaseServiceSettings`) that an
operator may override per tenant (the `tenants.limit_*` columns, NULL = the default, 0 = unlimited):

| name | enforced by | what is counted |
|---|---|---|
| `messages_per_minute` | replier | chat messages accepted per tenant and window |
| `agent_messages_per_minute` | replier | chat messages accepted per agent and window |
| `connections` | replier | open connections per tenant |
| `tokens_per_day` | replier | LLM tokens (prompt + completion) per tenant and budget day |
| `requests_per_minute` | configurator | authenticated API requests per tenant and window |

Where each is counted (docs/OPERATORS.md, "Counting"):
- the message rates and `requests_per_minute`: in Redis with REDIS_URL
  (`isolation.redis_counter`: one count for every replier and configurator worker, an INCRBY + PEXPIRE
  per `key:window_start` in one Lua script), in this process (`FixedWindowCounter`) without it and
  during a Redis outage (then each process enforces the limit on its own);
- `connections`: in Redis with REDIS_URL (`replier.connection_counts`: per tenant, a field per replier
  process, dead processes dropped once their alive key expires), else by each replier in its own process;
- `tokens_per_day`: in each replier, seeded from the tenant's `llm_usage` rows of the budget day, so a
  restart does not reset it (each replier adds only its own calls after the seed).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Protocol

from isolation.config import BaseServiceSettings

LIMIT_NAMES: tuple[str, ...] = (
    "messages_per_minute",
    "agent_messages_per_minute",
    "connections",
    "tokens_per_day",
    "requests_per_minute",
)
# The setting that holds each limit's default.
DEFAULT_SETTINGS: dict[str, str] = {
    "messages_per_minute": "tenant_messages_per_minute",
    "agent_messages_per_minute": "agent_messages_per_minute",
    "connections": "tenant_connections",
    "tokens_per_day": "tenant_tokens_per_day",
    "requests_per_minute": "tenant_requests_per_minute",
}
MAX_LIMIT = 2**62  # what an override may be at most (a BIGINT with room to add)
ACTIVE, SUSPENDED = "active", "suspended"
TENANT_STATUSES = (ACTIVE, SUSPENDED)


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's effective limits (0 = unlimited)."""

    messages_per_minute: int
    agent_messages_per_minute: int
    connections: int
    tokens_per_day: int
    requests_per_minute: int

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def defaults(settings: BaseServiceSettings) -> dict[str, int]:
    """The limit defaults of `settings`, by limit name."""
    return {name: int(getattr(settings, DEFAULT_SETTINGS[name])) for name in LIMIT_NAMES}


def effective(overrides: dict[str, int | None], settings: BaseServiceSettings) -> TenantLimits:
    """The overrides where set, the settings' defaults elsewhere."""
    base = defaults(settings)
    return TenantLimits(**{n: base[n] if overrides.get(n) is None else int(overrides[n]) for n in LIMIT_NAMES})


def check_overrides(overrides: dict[str, int | None]) -> dict[str, int | None]:
    """`overrides` with only known names and values that are None or 0..MAX_LIMIT (ValueError otherwise)."""
    unknown = set(overrides) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    for name, value in overrides.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT):
            raise ValueError(f"{name} must be an integer from 0 (unlimited) to {MAX_LIMIT}, or null (the default)")
    return overrides


@dataclass(frozen=True, slots=True)
class TenantControl:
    """What enforcement needs of one tenant: its status and the operator's overrides."""

    tenant_id: str
    status: str
    overrides: dict[str, int | None]

    @property
    def suspended(self) -> bool:
        return self.status == SUSPENDED

    def limits(self, settings: BaseServiceSettings) -> TenantLimits:
        return effective(self.overrides, settings)


def overrides_of(row: dict) -> dict[str, int | None]:
    """The overrides in a `tenants` row read as a dict (columns `limit_<name>`)."""
    return {name: None if row.get("limit_" + name) is None else int(row["limit_" + name]) for name in LIMIT_NAMES}


# ---- counting -----------------------------------------------------------------------------------
def window_start(now: float, window: float) -> float:
    """The start of the window `now` is in; windows are aligned to the epoch (86400 s: the UTC day)."""
    return math.floor(now / window) * window


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which check of a `take` refused (its index) and the seconds until its window resets."""

    index: int
    retry_after: float

    @property
    def retry_after_seconds(self) -> int:
        """`retry_after` rounded up to whole seconds (at least 1): what a Retry-After header says."""
        return max(1, math.ceil(self.retry_after))


class WindowCounter(Protocol):
    """Counts events per key in fixed windows. `take` is check-and-count in one step.

    The in-process `FixedWindowCounter` implements it, and so does `isolation.redis_counter.RedisWindowCounter`
    (a Lua script over INCRBY/PEXPIRE per `key:window_start`), so that several processes share one
    count; `AsyncRedisWindowCounter` is the same with awaited methods, for an event loop.
    """

    def take(self, checks: list[tuple[Hashable, int]], window: float, amount: int = 1) -> Refusal | None: ...

    def add(self, key: Hashable, window: float, amount: int) -> int: ...

    def count(self, key: Hashable, window: float) -> int: ...


class FixedWindowCounter:
    """Events per key in the current fixed window, for at most `max_keys` keys (least recent dropped).

    Fixed windows (not sliding) because they cost one integer per key and "reset at the window" is
    what a client is told (`retry_after`); a burst at a window's end and the next one's start can pass
    up to twice the limit in a short time, which is the usual trade-off.
    """

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._counts: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def _current(self, key: Hashable, start: float) -> int:
        entry = self._counts.get(key)
        return entry[1] if entry is not None and entry[0] == start else 0

    def take(self, checks: list[tuple[Hashable, int]], window: float, amount: int = 1) -> Refusal | None:
        """Count `amount` under every key of `checks` if each stays within its limit (0 = unlimited):
        None. Otherwise count nothing and say which check refused and when its window resets."""
        with self._lock:
            now = self._clock()
            start = window_start(now, window)
            for index, (key, limit) in enumerate(checks):
                if limit and self._current(key, start) + amount > limit:
                    return Refusal(index, max(start + window - now, 0.001))
            for key, _ in checks:
                self._counts[key] = (start, self._current(key, start) + amount)
                self._counts.move_to_end(key)
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
            return None

    def add(self, key: Hashable, window: float, amount: int) -> int:
        """Count `amount` whatever the limit (e.g. tokens already spent); returns the new count."""
        with self._lock:
            start = window_start(self._clock(), window)
            value = self._current(key, start) + amount
            self._counts[key] = (start, value)
            self._counts.move_to_end(key)
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
            return value

    def raise_to(self, key: Hashable, window: float, value: int) -> int:
        """Make the count at least `value` (a total read from the database); returns the count."""
        with self._lock:
            start = window_start(self._clock(), window)
            value = max(value, self._current(key, start))
            self._counts[key] = (start, value)
            self._counts.move_to_end(key)
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
            return value

    def count(self, key: Hashable, window: float) -> int:
        """The count of `key` in the current window."""
        with self._lock:
            return self._current(key, window_start(self._clock(), window))

    def has(self, key: Hashable, window: float) -> bool:
        """Whether `key` has an entry in the current window (a seeded budget, even at 0)."""
        with self._lock:
            entry = self._counts.get(key)
            return entry is not None and entry[0] == window_start(self._clock(), window)


# ---- presence: open replier connections per tenant, reported by each replier process -----------
PRESENCE_HEARTBEAT_SECONDS = 30.0  # a replier reports unchanged counts this often
PRESENCE_TTL_SECONDS = 90.0  # reports older than this are of a process that stopped: not counted
