"""Password hashes: the application role never reads them, login gets exactly one through `mt_login_secret`.

The privilege tests connect as the application role itself (the URL the backends use) on the PostgreSQL
leg; SQLite has no roles, so only the lookup semantics run on both legs.
"""

from __future__ import annotations

import secrets

import psycopg
import pytest

from isolation import migrate, system
from tests.conftest import DB_KIND
from testsupport.databases import _conninfo

needs_postgres = pytest.mark.skipif(
    DB_KIND != "postgresql", reason="column privileges and SECURITY DEFINER functions exist on PostgreSQL only"
)


def _account(hash_value: str | None = None, *, username: str | None = None, email: str | None = None) -> dict:
    suffix = secrets.token_hex(4)
    return system.create_account(
        username or f"hash_{suffix}", email or f"hash_{suffix}@example.test", hash_value or f"$argon2id$fake${suffix}"
    )


@needs_postgres
def test_the_app_role_cannot_read_password_hashes(provisioned, db):
    account = _account("$argon2id$the-secret-hash")
    with psycopg.connect(_conninfo(provisioned.url), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == provisioned.app_role
        for statement in (
            "SELECT password_hash FROM accounts",
            "SELECT * FROM accounts",
            "SELECT id FROM accounts WHERE password_hash LIKE '$argon2id$the%%'",
            "UPDATE accounts SET email = password_hash WHERE id = %(id)s",
            "UPDATE accounts SET status = status WHERE id = %(id)s RETURNING password_hash",
            "DELETE FROM accounts WHERE password_hash = '' AND id = %(id)s",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(statement, {"id": account["id"]})
        row = conn.execute(
            "SELECT id, username, email, status, created_at FROM accounts WHERE id = %s", (account["id"],)
        ).fetchone()
        assert row[:3] == (account["id"], account["username"], account["email"])
        # What the application does need still works: re-hashing a password and deleting an account.
        conn.execute("UPDATE accounts SET password_hash = 'rehashed' WHERE id = %s", (account["id"],))
    assert system.find_account_for_login(account["username"])[1] == "rehashed"
    assert system.get_account(account["id"]) == account


@needs_postgres
def test_an_upgrade_takes_the_hashes_back_from_an_app_role_that_could_read_them(provisioned, db):
    with psycopg.connect(_conninfo(provisioned.admin_url), autocommit=True) as conn:
        conn.execute(f'GRANT SELECT ON accounts TO "{provisioned.app_role}"')  # as every version before 3 did
    assert migrate.upgrade(provisioned.admin_url, app_role=provisioned.app_role) == []
    with (
        psycopg.connect(_conninfo(provisioned.url), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT password_hash FROM accounts")


@needs_postgres
def test_mt_login_secret_returns_one_row_only_for_an_exact_login(provisioned, db):
    account = _account("$argon2id$exact", username="Exact_Login_1", email="exact.login@example.test")
    _account(username="Exact_Login_10", email="exact.login10@example.test")
    with psycopg.connect(_conninfo(provisioned.url), autocommit=True) as conn:

        def rows(login):
            return conn.execute("SELECT id, password_hash FROM mt_login_secret(%s)", (login,)).fetchall()

        assert rows("Exact_Login_1") == [(account["id"], "$argon2id$exact")]
        assert rows("exact.login@example.test") == [(account["id"], "$argon2id$exact")]
        for probe in ("Exact_Login_%", "Exact_Login_", "exact_login_1", "%", "", " Exact_Login_1", None):
            assert rows(probe) == [], probe
        # PUBLIC may not call it; the application role may (granted by the upgrade).
        acl = conn.execute("SELECT proacl::text FROM pg_proc WHERE proname = 'mt_login_secret'").fetchone()[0]
        assert "{=" not in acl and ",=" not in acl and provisioned.app_role in acl


def test_login_lookup_needs_the_exact_name_and_prefers_the_username(db):
    owner = _account("$argon2id$owner", username="owner.mail@example.test", email="owner@example.test")
    other = _account("$argon2id$other", email="owner.mail@example.test")
    found, password_hash = system.find_account_for_login("owner.mail@example.test")
    assert (found, password_hash) == (owner, "$argon2id$owner")
    assert system.find_account_for_login(other["username"]) == (other, "$argon2id$other")
    assert system.find_account_for_login("owner.mail@%") is None
    assert system.get_account(other["id"]) == other and "password_hash" not in other


@needs_postgres
def test_the_app_role_can_no_longer_list_tenants_by_name(provisioned, db):
    """Cleanup stopped matching tenant names (customers choose them): the old lookup is retired."""
    with (
        psycopg.connect(_conninfo(provisioned.url), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
    ):
        conn.execute("SELECT * FROM mt_tenants_with_prefix('it_')")
