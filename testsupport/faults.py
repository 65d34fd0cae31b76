"""Fault injection for tests and scripts: a database made unavailable for a while, a full disk.

* `sqlite_write_lock(path)`: another *process* holds `BEGIN EXCLUSIVE` on the SQLite file until the
  block ends (what a backup tool or a stuck writer does); in WAL mode readers still read, every
  writer waits for its busy timeout and then gets "database is locked".
* `postgres_outage(database)`: on the test's own PostgreSQL database only (a `mt_test_*` database
  made by `testsupport.databases`), new connections are refused (`ALLOW_CONNECTIONS false`) and every
  open session is terminated (`pg_terminate_backend`) from an admin connection, until the block ends.
* `small_tmpfs(path, size)`: a tmpfs of `size` bytes mounted at `path` (needs root; `TmpfsUnavailable`
  with the reason otherwise), and `fill_disk(folder)` to use up its space; `sqlite_on_a_small_disk`
  puts a migrated SQLite database alone on one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from testsupport.databases import ProvisionedDatabase

_LOCK_SCRIPT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def sqlite_write_lock(path: str | Path) -> Iterator[subprocess.Popen]:
    """Another process holds the write lock of the SQLite file at `path` while the block runs."""
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _LOCK_SCRIPT, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"the lock holder did not start: {line!r}"
        yield proc
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the holder exits when its stdin closes
            proc.kill()
            proc.wait(5)


def _own_database(database: ProvisionedDatabase) -> str:
    """The database name of `database`, refused unless it is a throw-away test database."""
    from isolation.db import parse_database_url

    name = (parse_database_url(database.admin_url).params or {})["dbname"]
    if not name.startswith("mt_test_"):
        raise ValueError(f"refusing to take down {name!r}: only a test's own mt_test_* database")
    return name


def _admin_conninfo(database: ProvisionedDatabase) -> str:
    """An admin connection to the server's maintenance database `postgres` (never the target itself)."""
    from isolation.db import parse_database_url

    params = dict(parse_database_url(database.admin_url).params or {})
    params["dbname"] = "postgres"
    return " ".join(f"{key}={value}" for key, value in params.items())


def block_postgres(database: ProvisionedDatabase) -> int:
    """Refuse new connections to the test's own database and terminate its sessions; returns how many."""
    import psycopg
    from psycopg import sql

    name = _own_database(database)
    with psycopg.connect(_admin_conninfo(database), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return len(rows)


def unblock_postgres(database: ProvisionedDatabase) -> None:
    """Allow connections to the test's own database again."""
    import psycopg
    from psycopg import sql

    name = _own_database(database)
    with psycopg.connect(_admin_conninfo(database), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


@contextlib.contextmanager
def postgres_outage(database: ProvisionedDatabase) -> Iterator[int]:
    """The test's own PostgreSQL database refuses and drops every connection while the block runs."""
    terminated = block_postgres(database)
    try:
        yield terminated
    finally:
        unblock_postgres(database)


@contextlib.contextmanager
def database_outage(database: ProvisionedDatabase) -> Iterator[None]:
    """The database of `database` unusable for writes while the block runs, whatever its kind."""
    if database.kind == "sqlite":
        from isolation.db import parse_database_url

        with sqlite_write_lock(parse_database_url(database.url).path):
            yield
    else:
        with postgres_outage(database):
            yield


class TmpfsUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (not root, no mount permission in this container, ...)."""


@contextlib.contextmanager
def small_tmpfs(path: str | Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (created) while the block runs."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise TmpfsUnavailable("mounting a tmpfs needs root")
    command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)]
    result = subprocess.run(command, capture_output=True, text=True)  # noqa: S603 - fixed arguments
    if result.returncode != 0:
        raise TmpfsUnavailable(f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)  # noqa: S603, S607


@contextlib.contextmanager
def sqlite_on_a_small_disk(folder: str | Path, size: int = 8 * 1024 * 1024) -> Iterator[tuple[str, Path]]:
    """A migrated SQLite database alone on a tmpfs of `size` bytes mounted at `folder`, while the
    block runs: (its URL, the mount point to `fill_disk`). `TmpfsUnavailable` as `small_tmpfs`."""
    from isolation.migrate import upgrade

    with small_tmpfs(folder, size) as disk:
        url = f"sqlite:///{disk}/maitenant.db"
        upgrade(url)
        yield url, disk


def fill_disk(folder: str | Path, name: str = "filler") -> Path:
    """Write zeros into `folder/name` until the filesystem is full; returns the file (delete it to free)."""
    filler = Path(folder) / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512):  # big blocks, then the last scraps
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
    return filler


__all__ = [
    "TmpfsUnavailable",
    "block_postgres",
    "database_outage",
    "fill_disk",
    "postgres_outage",
    "small_tmpfs",
    "sqlite_on_a_small_disk",
    "sqlite_write_lock",
    "unblock_postgres",
]
