"""DATABASE_URL parsing and the log-safe description."""

from __future__ import annotations

import stat

import pytest

from isolation.db import make_database, parse_database_url
from isolation.migrate import describe


def test_sqlite_relative_and_absolute_paths():
    assert parse_database_url("sqlite:///data/maitenant.db").path == "data/maitenant.db"
    assert parse_database_url("sqlite:////var/lib/x.db").path == "/var/lib/x.db"


def test_postgresql_url_parts():
    parsed = parse_database_url("postgresql://app:s3cr%40t@db.local:6543/main?sslmode=disable")
    assert parsed.is_postgres
    assert parsed.params == {
        "dbname": "main",
        "host": "db.local",
        "port": 6543,
        "user": "app",
        "password": "s3cr@t",
        "sslmode": "disable",
    }


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://", "postgresql://host/", "nonsense"])
def test_unsupported_urls_are_refused_with_a_message(url):
    with pytest.raises(ValueError, match=r"sqlite|postgresql|scheme"):
        parse_database_url(url)


def test_describe_never_shows_the_password():
    text = describe("postgresql://app:topsecret@db.local:6543/main")
    assert "topsecret" not in text
    assert "app@db.local:6543/main" in text


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path):
    """Password hashes and encrypted keys live in the file: a new one (and its folder) is private."""
    path = tmp_path / "fresh" / "maitenant.db"
    db = make_database(f"sqlite:///{path}", admin=True)
    db.execute_sql("CREATE TABLE t (x INTEGER)")
    db.execute_sql("INSERT INTO t VALUES (1)")
    assert db.execute_sql("SELECT x FROM t").fetchone() == (1,)
    db.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in ("maitenant.db", "maitenant.db-wal", "maitenant.db-shm"):
        if (path.parent / name).exists():
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name


def test_an_existing_sqlite_file_keeps_the_operators_permissions(tmp_path):
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    make_database(f"sqlite:///{path}", admin=True).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
