"""One log line per (reason, source) and interval: refused connections and rejected messages at INFO.

An operator must see at INFO why a client is refused or its messages rejected, but a client retrying
every second with a bad key (or sending the same bad message in a loop) must not write a line each
time. The first event of a (reason, source) pair is logged at once, with what identifies it; later ones
within `interval` seconds are only counted, and the next line after the interval says how many were
suppressed. Unlike `replier.outbox.frames.MalformedFrames` (which defers its count to a timer because
frames carry nothing worth logging individually), a refusal's first line is written immediately.
"""

from __future__ import annotations

import logging
import time

_MAX_SOURCES = 10_000


class ThrottledLog:
    """`log(reason, source, fmt, *args)`: at most one line per (reason, source) per `interval` seconds."""

    def __init__(self, logger: logging.Logger, interval: float, level: int = logging.INFO) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        # (reason, source) -> (time the interval started, events suppressed since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def log(self, reason: str, source: str, fmt: str, *args: object) -> bool:
        """Log the event now, or count it if its pair was logged less than `interval` ago; True if logged."""
        now = time.monotonic()
        key = (reason, source)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._seen[key] = (entry[0], entry[1] + 1)
            return False
        if entry is None and len(self._seen) >= _MAX_SOURCES:
            self._prune(now)
        suppressed = entry[1] if entry is not None else 0
        self._seen[key] = (now, 0)
        if suppressed:
            fmt += " (%d more suppressed in the last %g s)"
            args = (*args, suppressed, self.interval)
        self.logger.log(self.level, fmt, *args)
        return True

    def _prune(self, now: float) -> None:
        """Forget pairs whose interval is over (their suppressed counts are lost; bounded memory wins)."""
        for key, (started, _) in list(self._seen.items()):
            if now - started >= self.interval:
                del self._seen[key]
        if len(self._seen) >= _MAX_SOURCES:
            self._seen.clear()
