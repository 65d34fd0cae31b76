"""DELETE /api/v1/auth/me: the account goes, with the tenants it alone belongs to; nothing else."""

from __future__ import annotations

from cfg_helpers import PASSWORD, create_agent, create_key, login, member_of, seed_history

from testsupport.databases import table_counts, tenant_row_counts


def _delete_me(client, user, password=PASSWORD):
    return client.request("DELETE", "/api/v1/auth/me", json={"password": password}, headers=user.headers)


def test_account_and_its_sole_tenant_are_deleted_exactly(client, owner, provisioned):
    agent = create_agent(client, owner, template_id="caring_friend")
    create_key(client, owner, agent["id"])
    seed_history(owner, agent["id"], messages=2)
    before = table_counts(provisioned)

    response = _delete_me(client, owner)

    assert response.status_code == 200, response.text
    deleted = response.json()["deleted"]
    assert deleted["accounts"] == 1 and deleted["tenants"] == 1 and deleted["agents"] == 1
    assert deleted["messages"] == before["messages"][owner.tenant_id]
    assert set(tenant_row_counts(provisioned, owner.tenant_id).values()) == {0}
    after = table_counts(provisioned)
    for table, per_tenant in before.items():
        assert after[table] == {t: n for t, n in per_tenant.items() if t != owner.tenant_id}, table
    assert login_status(client, owner) == 401
    assert client.get("/api/v1/auth/me", headers=owner.headers).status_code == 401


def login_status(client, user) -> int:
    return client.post("/api/v1/auth/login", json={"username": user.username, "password": PASSWORD}).status_code


def test_wrong_password_deletes_nothing(client, owner, provisioned):
    before = table_counts(provisioned)
    response = _delete_me(client, owner, password="not the password")
    assert response.status_code == 401
    assert response.json()["error"]["code"]
    assert table_counts(provisioned) == before
    assert login(client, owner.username)["tokens"]["access_token"]


def test_only_owner_of_a_shared_tenant_gets_409_and_a_member_just_leaves(client, owner, provisioned):
    member = member_of(client, owner, "member")
    before = table_counts(provisioned)
    refused = _delete_me(client, owner)
    assert refused.status_code == 409
    assert "only owner" in refused.json()["error"]["message"]
    assert table_counts(provisioned) == before

    left = _delete_me(client, member)
    assert left.status_code == 200, left.text
    deleted = left.json()["deleted"]
    assert deleted["accounts"] == 1 and deleted["memberships"] >= 1
    assert deleted["tenants"] == 1  # the member's own personal tenant; the owner's tenant stays
    assert client.get("/api/v1/tenant", headers=owner.headers).status_code == 200
    assert _delete_me(client, owner).status_code == 200  # now the owner is alone again


def test_missing_password_is_422(client, owner):
    response = client.request("DELETE", "/api/v1/auth/me", json={}, headers=owner.headers)
    assert response.status_code == 422
