"""DATABASE_URL parsing and the log-safe description."""

from __future__ import annotations

import pytest

from isolation.db import parse_database_url
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
