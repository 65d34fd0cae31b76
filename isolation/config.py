"""Database settings shared by both backends (pydantic-settings: environment or `.env`)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///data/maitenant.db"


class DatabaseSettings(BaseSettings):
    """`DATABASE_URL` picks the database; PostgreSQL runs as the non-owner `DATABASE_APP_ROLE`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    # Role the application switches to on PostgreSQL so row-level security applies even when the URL
    # names the owner. `db-upgrade` creates it (NOLOGIN) and grants it table access.
    database_app_role: str = Field(default="maitenant_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    database_pool_size: int = Field(default=20, ge=1, le=1000)
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)


@lru_cache(maxsize=1)
def get_database_settings() -> DatabaseSettings:
    return DatabaseSettings()
