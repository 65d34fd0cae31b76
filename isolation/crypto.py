"""Encryption of stored provider keys (an agent's LLM API key) with Fernet.

The key comes from `MAITENANT_ENCRYPTION_KEY` (a Fernet key) or, failing that, is derived from
`SECRET_KEY`, so the configurator (which encrypts) and the replier (which decrypts) agree as long as
they share settings. A development default exists; `ENVIRONMENT=production` refuses it.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "maitenant-development-secret-change-me"  # noqa: S105 - refused in production


class SecretSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    secret_key: str = DEV_SECRET_KEY
    maitenant_encryption_key: str | None = None
    environment: str = "development"


class SecretBoxError(RuntimeError):
    """A stored secret cannot be decrypted (wrong key) or the settings are unsafe."""


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    settings = SecretSettings()
    if settings.maitenant_encryption_key:
        return Fernet(settings.maitenant_encryption_key.encode())
    if settings.environment == "production" and settings.secret_key == DEV_SECRET_KEY:
        raise SecretBoxError("ENVIRONMENT=production needs SECRET_KEY or MAITENANT_ENCRYPTION_KEY to be set")
    digest = hashlib.sha256(b"maitenant-fernet\x00" + settings.secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt_secret(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def decrypt_secret(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretBoxError("stored secret cannot be decrypted with the configured key") from exc


def reset_cache() -> None:
    """Forget the derived key (tests that change settings)."""
    _fernet.cache_clear()
