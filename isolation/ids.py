"""Identifiers, secrets and hashes.

Ids are prefixed random strings (`ten_…`, `agt_…`). A chat stream id is a hash of *all* of tenant,
agent, platform, kind and group/user, so two tenants' "qq group 42" can never share a stream.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

API_KEY_PREFIX = "mtk_"


def new_id(prefix: str) -> str:
    """A new random id such as `agt_3kq0...` (96 random bits, url-safe)."""
    return f"{prefix}_{secrets.token_urlsafe(12).replace('-', 'x').replace('_', 'y')}"


def utcnow() -> datetime:
    """Naive UTC now: every timestamp column holds UTC without an offset on both databases."""
    return datetime.now(UTC).replace(tzinfo=None)


def chat_stream_id(tenant_id: str, agent_id: str, platform: str, kind: str, peer_id: str) -> str:
    """Deterministic stream id from the full T+A+P+chat tuple."""
    raw = "\x1f".join((tenant_id, agent_id, platform, kind, peer_id)).encode()
    return "cs_" + hashlib.sha256(raw).hexdigest()[:32]


def new_api_key_secret() -> str:
    """`mtk_` + 32 random bytes, url-safe. Shown to the user once, never stored."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(secret: str) -> str:
    """SHA-256 hex of an API key secret; the only form the database keeps."""
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_display_prefix(secret: str) -> str:
    """A short, non-secret prefix that lets a user recognise a key in lists."""
    return secret[:10]
