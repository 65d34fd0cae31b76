"""Shared fixtures: one real, migrated database per test session, of the kind the nox leg asks for.

`MAITENANT_TEST_DB=sqlite|postgresql` picks the leg (default sqlite). On the PostgreSQL leg an
unreachable server skips the tests with the reason locally and fails them when `CI=true`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from isolation import db as isolation_db
from testsupport.databases import ProvisionedDatabase, leg_database

DB_KIND = os.environ.get("MAITENANT_TEST_DB", "sqlite")

# Code and servers started without SECRET_KEY keep a generated secret in DATA_DIR (isolation/secret.py):
# the session gets a private one (inherited by server subprocesses), never the repository's data/.
_DATA_DIR = tempfile.mkdtemp(prefix="maitenant-data-")
os.environ["DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, True)


@pytest.fixture(scope="session")
def provisioned() -> Iterator[ProvisionedDatabase]:
    """A fresh migrated database for the whole session (dropped at the end)."""
    with leg_database(DB_KIND, in_ci=os.environ.get("CI", "").lower() == "true") as database:
        yield database


@pytest.fixture(scope="session")
def database_url(provisioned: ProvisionedDatabase) -> str:
    """The URL the application uses (a non-owner role on PostgreSQL)."""
    return provisioned.url


@pytest.fixture(scope="session")
def configured_db(provisioned: ProvisionedDatabase):
    """The `isolation.db.database` proxy pointed at the session database, as the application role."""
    real = isolation_db.configure(provisioned.url, app_role=provisioned.app_role)
    yield real
    isolation_db.close_database()
