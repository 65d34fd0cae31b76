"""Configurator settings (pydantic-settings: environment variables or `.env`).

`SECRET_KEY` signs JWTs (and, through `isolation.crypto`, derives the key that encrypts agents' LLM
provider keys). `ENVIRONMENT=production` refuses the development default secret at start-up.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from isolation.config import get_database_settings
from isolation.crypto import DEV_SECRET_KEY

API_PREFIX = "/api/v1"


class UnsafeSettingsError(ValueError):
    """The settings cannot be used in this environment (e.g. the default secret in production)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    secret_key: str = Field(default=DEV_SECRET_KEY, min_length=16)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Empty means "the DATABASE_URL of isolation's settings" (sqlite:///data/maitenant.db by default).
    database_url: str = ""
    database_app_role: str | None = None

    jwt_issuer: str = "maitenant-configurator"
    jwt_audience: str = "maitenant-api"
    jwt_refresh_audience: str = "maitenant-refresh"
    access_token_minutes: int = Field(default=15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=14, ge=1, le=365)

    # Failed logins allowed per (username, client address) in a sliding window; further attempts get
    # 429 with Retry-After. The counters live in this process only ("safe to lose": a restart or a
    # second process just starts counting again). See configurator/core/ratelimit.py.
    login_rate_limit: int = Field(default=5, ge=1, le=10_000)
    login_rate_window_seconds: int = Field(default=60, ge=1, le=86_400)

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

    @model_validator(mode="after")
    def _safe_for_environment(self) -> Settings:
        if self.environment == "production":
            if self.secret_key == DEV_SECRET_KEY:
                raise UnsafeSettingsError(
                    "ENVIRONMENT=production refuses the default SECRET_KEY: set SECRET_KEY to a long random "
                    "value (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
                )
            if len(self.secret_key) < 32:
                raise UnsafeSettingsError("ENVIRONMENT=production needs a SECRET_KEY of at least 32 characters")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or get_database_settings().database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
