"""Encryption of stored provider keys (an agent's LLM API key) with Fernet.

The key comes from `MAITENANT_ENCRYPTION_KEY` (a Fernet key) or, failing that, is derived from the
server secret (`BaseServiceSettings.server_secret()`: `SECRET_KEY`, or the secret generated in
`DATA_DIR` at first start), so the configurator (which encrypts) and the replier (which decrypts)
agree as long as they share settings or the data directory. No public default exists.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from pydantic import ValidationError

from isolation.config import BaseServiceSettings, settings_error_message
from isolation.secret import UnsafeSecretError


class SecretBoxError(RuntimeError):
    """A stored secret cannot be decrypted (wrong key) or the key settings are unusable."""


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    try:
        settings = BaseServiceSettings()  # read now, not from a cache: tests change the environment
    except ValidationError as exc:  # e.g. a public SECRET_KEY: the reason, never the value
        raise SecretBoxError(settings_error_message(exc)) from None
    if settings.maitenant_encryption_key:
        try:
            return Fernet(settings.maitenant_encryption_key.encode())
        except ValueError as exc:  # never echo the value: it is the key
            raise SecretBoxError(
                "MAITENANT_ENCRYPTION_KEY is not a valid Fernet key (32 url-safe base64 bytes)"
            ) from exc
    try:
        server_secret = settings.server_secret()
    except UnsafeSecretError as exc:
        raise SecretBoxError(str(exc)) from exc
    digest = hashlib.sha256(b"maitenant-fernet\x00" + server_secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def check_key() -> None:
    """Resolve the encryption key now (start-up), so a bad setting stops the process, not a reply."""
    _fernet()


def encrypt_secret(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def decrypt_secret(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretBoxError("stored secret cannot be decrypted with the configured key") from exc


def reset_cache() -> None:
    """Forget the derived key, so the next use reads the settings again (tests that change them)."""
    _fernet.cache_clear()
