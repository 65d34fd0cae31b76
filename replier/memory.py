"""Chat memories: what goes into the prompt and whether a new memory line is worth storing."""

from __future__ import annotations

MAX_MEMORY_CHARS = 300


def worth_storing(candidate: str | None, existing: list[str]) -> str | None:
    """The cleaned memory line, or None when empty or already known (case-insensitive)."""
    if not candidate:
        return None
    line = " ".join(candidate.split())[:MAX_MEMORY_CHARS]
    if not line:
        return None
    lowered = line.lower()
    if any(lowered == item.lower() for item in existing):
        return None
    return line
