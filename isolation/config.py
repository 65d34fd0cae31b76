"""The settings every MaiTenant process reads (pydantic-settings: environment variables or `.env`).

`BaseServiceSettings` is the one place that says where settings come from, which database to use and
which secret protects tokens and stored LLM keys. The configurator's and the replier's settings extend
it (the replier through `isolation.egress.EgressSettings`, which adds the outbound LLM policy), so both
read the same names with the same defaults and refuse the same unsafe values.

The secret is checked here, at construction: a `SECRET_KEY` that is public or too short for
`ENVIRONMENT` fails validation in every process. Without `SECRET_KEY` the secret generated in `DATA_DIR`
is used (`server_secret()`); it is resolved when a process needs it (the configurator at start-up, the
replier's `isolation.crypto.check_key()` at start-up), not by every tool that only needs the database.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from isolation.secret import check_secret_key, secret_from_data_dir

DEFAULT_DATABASE_URL = "sqlite:///data/maitenant.db"


class BaseServiceSettings(BaseSettings):
    """Database and secret settings shared by every process; services subclass it for their own."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # -- database: `DATABASE_URL` picks it; PostgreSQL runs as the non-owner `DATABASE_APP_ROLE`.
    database_url: str = DEFAULT_DATABASE_URL
    # Role the application switches to on PostgreSQL so row-level security applies even when the URL
    # names the owner. `db-upgrade` creates it (NOLOGIN) and grants it table access.
    database_app_role: str = Field(default="maitenant_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    database_pool_size: int = Field(default=20, ge=1, le=1000)
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)

    # -- /health of both backends (isolation/health.py)
    health_cache_seconds: float = Field(default=1.0, ge=0, description="a /health result is reused this long")
    health_min_free_mb: int = Field(default=64, ge=0, description="SQLite: less free disk fails the disk check")
    health_write_timeout_ms: int = Field(default=500, ge=1, description="SQLite: wait for the write lock")

    # -- secret (isolation/secret.py). Empty SECRET_KEY: the secret kept in DATA_DIR, generated at first start.
    secret_key: str = Field(default="", repr=False)
    data_dir: Path = Path("data")
    # "production" asks for a longer SECRET_KEY (and, in the configurator, turns off the API docs).
    environment: str = "development"
    # A Fernet key for stored LLM keys; unset, one is derived from the server secret (isolation/crypto.py).
    maitenant_encryption_key: str | None = Field(default=None, repr=False)

    # -- scale-out (README "Scaling out"). Unset REDIS_URL: one process, nothing shared, as before.
    # Set: the replier's Socket.IO server uses python-socketio's Redis manager, key/agent/tenant changes
    # reach every replier through Redis pub/sub (isolation/signals.py), and the configurator's rate
    # limits are counted in Redis. The URL may hold a password: never logged, never in a repr.
    redis_url: str = Field(default="", repr=False)
    # Every Redis channel and key this deployment uses starts with it (several deployments, or test
    # runs, can share one Redis).
    redis_prefix: str = Field(default="maitenant", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    # -- per-tenant limits (isolation/limits.py): the defaults of every tenant; an operator overrides
    # them per tenant (`invoke tenant-limits`, /api/v1/operator). 0 means unlimited.
    tenant_messages_per_minute: int = Field(default=1200, ge=0, description="chat messages per tenant and window")
    agent_messages_per_minute: int = Field(default=600, ge=0, description="chat messages per agent and window")
    tenant_connections: int = Field(default=1000, ge=0, description="open replier connections per tenant")
    tenant_tokens_per_day: int = Field(default=0, ge=0, description="LLM tokens per tenant and budget day")
    tenant_requests_per_minute: int = Field(default=600, ge=0, description="configurator requests per tenant")
    # The window of the per-minute limits and the budget "day" (aligned to the epoch, so 86400 is the
    # UTC day); shorter only in tests.
    limit_window_seconds: float = Field(default=60.0, gt=0, le=86_400)
    token_budget_window_seconds: float = Field(default=86_400.0, gt=0, le=31 * 86_400)

    @model_validator(mode="after")
    def _safe_for_environment(self) -> BaseServiceSettings:
        """Refuse a public or short SECRET_KEY (an `UnsafeSecretError`, a ValueError: a validation error)."""
        if self.secret_key:
            check_secret_key(self.secret_key, self.environment)
        return self

    def server_secret(self) -> str:
        """`SECRET_KEY` when set (checked at construction), else the secret of `DATA_DIR`, created on first use.

        Raises `isolation.secret.UnsafeSecretError` when the secret file cannot be used.
        """
        return self.secret_key or secret_from_data_dir(self.data_dir)


def settings_error_message(exc: ValidationError) -> str:
    """The reasons of a settings `ValidationError`, one line, for a start-up refusal (no pydantic framing)."""
    return "; ".join(str(err.get("ctx", {}).get("error") or err["msg"]) for err in exc.errors())


@lru_cache(maxsize=1)
def get_base_settings() -> BaseServiceSettings:
    """The shared settings of this process, read once (`get_base_settings.cache_clear()` in tests)."""
    return BaseServiceSettings()
