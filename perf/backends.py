"""Both backends on a throw-away database for a script run (fault_logs, soak): their environment,
and an account to drive the configurator with.

Only what these scripts share. The servers may come from another source tree (`code_dir`, put on
`PYTHONPATH`; the caller runs them with that directory as the working directory), so nothing here
imports the application.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx

PASSWORD = "perf-run-password-0123"  # noqa: S105 - a throw-away account of one run


def server_env(database, port: int, code_dir: Path, *, secret_key: str, log_level: str, **extra: str) -> dict[str, str]:
    """The environment of either backend: this process's, minus what would change their behaviour
    (production mode, trusted proxies), on `database` and `port`, with cheap password hashing and
    `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "FORWARDED_ALLOW_IPS")}
    env.update(extra)
    env["DATABASE_URL"] = database.url
    env["HOST"], env["PORT"] = "127.0.0.1", str(port)
    env["SECRET_KEY"] = secret_key
    env["PASSWORD_HASH_TIME_COST"], env["PASSWORD_HASH_MEMORY_KIB"] = "1", "8192"  # cheap hashing
    env["LOG_LEVEL"], env["PYTHONPATH"] = log_level, str(code_dir)
    if database.app_role:
        env["DATABASE_APP_ROLE"] = database.app_role
    return env


def register(base: str, prefix: str) -> str:
    """Register a new account (and its personal tenant) on the configurator at `base`; its access token."""
    name = f"{prefix}{secrets.token_hex(4)}"
    registered = httpx.post(
        f"{base}/api/v1/auth/register",
        json={"username": name, "email": f"{name}@example.com", "password": PASSWORD},
        timeout=30,
    )
    registered.raise_for_status()
    return registered.json()["tokens"]["access_token"]
