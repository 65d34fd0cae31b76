"""Configurator settings (pydantic-settings: environment variables or `.env`).

The database and secret settings are the shared ones of `isolation.config.BaseServiceSettings`, which
also refuses the public development value of earlier versions and short keys. `SECRET_KEY` signs JWTs
(and, through `isolation.crypto`, derives the key that encrypts agents' LLM provider keys); unset, the
secret generated at first start in `DATA_DIR` is resolved here, at start-up, so an unusable secret
file stops the configurator before it serves anything.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from isolation.config import BaseServiceSettings

API_PREFIX = "/api/v1"


class Settings(BaseServiceSettings):
    """The shared settings (database, secret) plus the configurator's own."""

    # Narrower than the base: a misspelt ENVIRONMENT must not quietly serve the API docs in production.
    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    jwt_issuer: str = "maitenant-configurator"
    jwt_audience: str = "maitenant-api"
    jwt_refresh_audience: str = "maitenant-refresh"
    access_token_minutes: int = Field(default=15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=14, ge=1, le=365)

    # Failed logins allowed per account (its username and email are one bucket; an unknown name is a
    # bucket of its own) and, larger, per client address, in a sliding window; further attempts get
    # 429 with Retry-After. Registrations are limited per client address. The counters live in this
    # process only ("safe to lose": a restart or a second process just starts counting again). See
    # configurator/core/ratelimit.py and docs/SECURITY.md.
    login_rate_limit: int = Field(default=5, ge=1, le=10_000)
    login_rate_window_seconds: int = Field(default=60, ge=1, le=86_400)
    login_address_rate_limit: int = Field(default=20, ge=1, le=1_000_000)
    register_rate_limit: int = Field(default=10, ge=1, le=1_000_000)
    register_rate_window_seconds: int = Field(default=3600, ge=1, le=86_400)

    # The client address is the TCP peer's. Only when this is set (comma-separated addresses or
    # networks of the reverse proxies in front, or "*") are X-Forwarded-For/-Proto from those peers
    # trusted; unset, the headers are ignored even from loopback (they would let anyone pick the
    # address that the rate limits count).
    forwarded_allow_ips: str | None = None

    # New passwords: at least this long, not in the bundled list of common passwords, not the
    # username or email (configurator/core/passwords.py).
    password_min_length: int = Field(default=10, ge=8, le=256)
    # Largest tenant `settings` and agent persona/config/llm, as compact JSON (UTF-8 bytes).
    max_settings_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # /docs, /redoc and /openapi.json: served in development, off in production unless true.
    docs_enabled: bool | None = None

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # Worker threads for the sync routes (Starlette runs them in anyio's thread pool, 40 by default).
    # Every database call releases the GIL, and with dozens of threads each release becomes a contended
    # hand-off: on 2 cores, 8 threads served GET /agents ~10% faster than 40, with p99 13 ms instead of
    # 20 ms (docs/PERFORMANCE.md). Password hashing does not use this pool (see
    # `password_hash_concurrency`).
    threadpool_size: int = Field(default=8, ge=1, le=1000)

    # Argon2id cost (pwdlib's recommended parameters by default). Existing hashes are upgraded at
    # the next successful login when these change.
    password_hash_time_cost: int = Field(default=3, ge=1, le=20)
    password_hash_memory_kib: int = Field(default=65536, ge=1024, le=4 * 1024 * 1024)
    # Argon2 computations at once (each keeps one core busy and holds `password_hash_memory_kib`);
    # further logins wait for a slot without taking a thread from the routes' pool.
    password_hash_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)

    log_level: str = "info"
    # uvicorn worker processes of `python -m configurator` (README "Scaling out"); each opens its own
    # database pool. With more than one, set REDIS_URL so the login limits are one limit, not one each.
    workers: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _resolve_signing_secret(self) -> Settings:
        """JWTs are signed with `secret_key`: resolve the DATA_DIR secret now when SECRET_KEY is unset
        (the base validator, which runs first, has checked a SECRET_KEY that is set)."""
        self.secret_key = self.server_secret()  # UnsafeSecretError (a ValueError): a validation error
        return self

    @property
    def docs_served(self) -> bool:
        """Whether the interactive docs and the OpenAPI schema are served (DOCS_ENABLED, else not in production)."""
        return self.docs_enabled if self.docs_enabled is not None else self.environment != "production"

    @property
    def trusted_proxies(self) -> str | None:
        """FORWARDED_ALLOW_IPS when set to something (blank counts as unset)."""
        value = (self.forwarded_allow_ips or "").strip()
        return value or None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
