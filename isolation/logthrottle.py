"""One log line per (reason, source) and interval: refusals, rejected messages and database faults.

An operator must see at INFO why a client is refused or its messages rejected, but a client retrying
every second with a bad key (or sending the same bad message in a loop) must not write a line each
time. The first event of a (reason, source) pair is logged at once, with what identifies it; later ones
within `interval` seconds are only counted, and the next line after the interval says how many were
suppressed. Unlike `replier.outbox.frames.MalformedFrames` (which defers its count to a timer because
frames carry nothing worth logging individually), a refusal's first line is written immediately.

Database faults use the same rule (`FaultLog`): during an outage every request fails the same way,
and a traceback per request filled the disk the database needs (about 44 MB in 30 s at 100
requests/s). A fault kind gets one line per interval with the count, and a traceback only on the
first line of an episode (after a quiet interval), where it says something new.
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

    def log(self, reason: str, source: str, fmt: str, *args: object, exc_info: BaseException | None = None) -> bool:
        """Log the event now, or count it if its pair was logged less than `interval` ago; True if logged.

        `exc_info` (an exception) is logged with its traceback only when the pair starts a new episode:
        first seen, or quiet (nothing suppressed) for a whole interval before this event.
        """
        now = time.monotonic()
        key = (reason, source)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._seen[key] = (entry[0], entry[1] + 1)
            return False
        if entry is None and len(self._seen) >= _MAX_SOURCES:
            self._prune(now)
        suppressed = entry[1] if entry is not None else 0
        episode = entry is None or (suppressed == 0 and now - entry[0] >= 2 * self.interval)
        self._seen[key] = (now, 0)
        if suppressed:
            fmt += " (%d more suppressed in the last %g s)"
            args = (*args, suppressed, self.interval)
        self.logger.log(self.level, fmt, *args, exc_info=exc_info if episode else None)
        return True

    def _prune(self, now: float) -> None:
        """Forget pairs whose interval is over (their suppressed counts are lost; bounded memory wins)."""
        for key, (started, _) in list(self._seen.items()):
            if now - started >= self.interval:
                del self._seen[key]
        if len(self._seen) >= _MAX_SOURCES:
            self._seen.clear()


class FaultLog:
    """Database faults (`isolation.faults.Fault`), one WARNING per kind and interval, a traceback once per episode.

    `report(fault, what, exc)`: `what` says what failed ("POST /api/v1/agents", "chat message"); the
    count of suppressed lines covers every `what` of the kind, so an outage is a handful of lines.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = ThrottledLog(logger, interval, logging.WARNING)

    def report(self, fault: object, what: str, exc: BaseException) -> bool:
        """Log (or count) one failure of `what` caused by `fault`; True if a line was written."""
        code = getattr(fault, "code", "fault")
        reason = getattr(fault, "reason", type(exc).__name__)
        return self._log.log(code, "", "%s: %s failed (%s)", code, what, reason, exc_info=exc)
