"""Login end to end while the application role cannot read password hashes (PostgreSQL column privileges)."""

from __future__ import annotations

import psycopg
import pytest
from cfg_helpers import login, register

from testsupport.databases import _conninfo


def test_login_and_me_work_while_the_app_role_cannot_read_hashes(client, provisioned):
    user = register(client, prefix="hsh")
    for name in (user.username, user.email):
        assert login(client, name)["account"]["id"] == user.account_id
    wrong = client.post("/api/v1/auth/login", json={"username": user.username, "password": user.password + "x"})
    assert wrong.status_code == 401
    me = client.get("/api/v1/auth/me", headers=user.headers)
    assert me.status_code == 200 and me.json()["account"]["id"] == user.account_id
    assert "password" not in me.text
    if provisioned.kind != "postgresql":
        return  # SQLite has no roles
    with psycopg.connect(_conninfo(provisioned.url), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == provisioned.app_role
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT password_hash FROM accounts")
