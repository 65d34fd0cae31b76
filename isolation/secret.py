"""The server secret both backends share: `SECRET_KEY` when set, else one generated at first start.

It signs the configurator's JWTs and derives the key that encrypts agents' LLM keys (which the
replier decrypts), so both processes must resolve the same value. A default install has no
`SECRET_KEY`: the first process to start writes a random one to `DATA_DIR/secret_key` (owner-only,
0600) and every later start, of either backend, reads it back. No public value is ever used: the
development default of earlier versions is refused wherever it comes from.

Creation is atomic: the secret is written to a private temporary file and published with `link()`,
which fails if the name exists, so two processes starting together agree (the loser reads the
winner's file) and nobody ever reads a half-written one.

This module holds the rules and the file handling only; the settings that name `SECRET_KEY`, `DATA_DIR`
and `ENVIRONMENT`, and the validator that applies `check_secret_key` to them, are in `isolation.config`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

SECRET_FILE_NAME = "secret_key"  # noqa: S105 - a file name, not a secret
# Published in the source of earlier versions: anyone could sign tokens with them. Never accepted.
PUBLIC_SECRET_KEYS = frozenset({"maitenant-development-secret-change-me"})
MIN_SECRET_LENGTH = 16
MIN_PRODUCTION_SECRET_LENGTH = 32
_GENERATED_BYTES = 48  # secrets.token_urlsafe(48): 64 characters, 384 bits


class UnsafeSecretError(ValueError):
    """The secret cannot be used: a public or short `SECRET_KEY`, or an unsafe or unreadable secret file.

    A `ValueError`, so pydantic validators that call into this module report it as a settings error.
    """


def check_secret_key(value: str, environment: str = "development") -> str:
    """`value` if it is safe to sign with in `environment`, else `UnsafeSecretError` saying what to do."""
    if value in PUBLIC_SECRET_KEYS:
        raise UnsafeSecretError(
            "SECRET_KEY is the public development value of earlier versions and is refused: unset it (a random "
            "secret is then generated in DATA_DIR) or set a long random value, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    minimum = MIN_PRODUCTION_SECRET_LENGTH if environment == "production" else MIN_SECRET_LENGTH
    if len(value) < minimum:
        where = "ENVIRONMENT=production needs" if environment == "production" else "MaiTenant needs"
        raise UnsafeSecretError(f"{where} a SECRET_KEY of at least {minimum} characters")
    return value


def _refuse_unsafe(path: Path, info: os.stat_result) -> None:
    """`UnsafeSecretError` unless `info` is a regular file of ours that nobody else may read or write."""
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeSecretError(f"the secret file {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise UnsafeSecretError(
            f"the secret file {path} is owned by uid {info.st_uid}, not by this user ({os.geteuid()}): "
            "refusing a secret someone else controls"
        )
    if info.st_mode & 0o077:
        raise UnsafeSecretError(
            f"the secret file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it. "
            f"Run `chmod 600 {path}` (and, since it may have leaked, consider replacing it: sessions end and "
            "stored LLM keys must be entered again)"
        )


def _read_secret_file(path: Path) -> str:
    """The secret in `path`, refusing a symlink or a file others could read or replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafeSecretError(f"cannot read the secret file {path}: {exc.strerror or exc}") from exc
    try:
        _refuse_unsafe(path, os.fstat(fd))  # checked on the open file: no swap between check and read
        value = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    finally:
        os.close(fd)
    if len(value) < MIN_PRODUCTION_SECRET_LENGTH:
        raise UnsafeSecretError(
            f"the secret file {path} holds fewer than {MIN_PRODUCTION_SECRET_LENGTH} characters: delete it to have "
            "a new one generated, or set SECRET_KEY"
        )
    return value


def _create_secret_file(path: Path) -> None:
    """Write a new random secret to `path` unless one exists (then leave the existing one alone)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(_GENERATED_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process published first: keep theirs
            os.link(temporary, path)  # atomic, and never replaces an existing secret
    finally:
        temporary.unlink(missing_ok=True)
    # The new name must survive a power loss too: agents' LLM keys are encrypted with this secret as
    # soon as it is read, and a secret lost with its directory entry would make them unreadable.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def secret_from_data_dir(data_dir: Path | str) -> str:
    """The secret kept in `data_dir`, generated there (and the directory created, 0700) on first use."""
    folder = Path(data_dir)
    path = folder / SECRET_FILE_NAME
    if not path.exists() and not path.is_symlink():
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_secret_file(path)
        except OSError as exc:
            raise UnsafeSecretError(
                f"cannot create the secret file {path}: {exc.strerror or exc}; set SECRET_KEY or make DATA_DIR writable"
            ) from exc
    return _read_secret_file(path)
