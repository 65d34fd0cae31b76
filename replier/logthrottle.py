"""Moved to `isolation.logthrottle` (both backends throttle their logs); kept so older imports work."""

from isolation.logthrottle import FaultLog, ThrottledLog

__all__ = ["FaultLog", "ThrottledLog"]
