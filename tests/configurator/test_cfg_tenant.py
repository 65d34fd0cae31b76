"""Tenant read/update/stats/delete, templates, and role rules (owner/admin/member)."""

from __future__ import annotations

import pytest
from cfg_helpers import create_agent, create_key, member_of, register, seed_history

from isolation import Scoped


def test_get_and_patch_tenant(client, owner):
    tenant = client.get("/api/v1/tenant", headers=owner.headers).json()
    assert tenant["id"] == owner.tenant_id
    response = client.patch(
        "/api/v1/tenant",
        json={"name": "Renamed ✓", "settings": {"locale": "zh-CN", "n": [1, 2]}},
        headers=owner.headers,
    )
    assert response.status_code == 200
    assert response.json()["name"] == "Renamed ✓"
    assert response.json()["settings"] == {"locale": "zh-CN", "n": [1, 2]}
    assert client.get("/api/v1/tenant", headers=owner.headers).json()["name"] == "Renamed ✓"


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "x" * 101}, {"settings": []}, {"id": "ten_other"}])
def test_patch_tenant_validation(client, owner, body):
    response = client.patch("/api/v1/tenant", json=body, headers=owner.headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_stats_are_real_counts(client, owner):
    empty = client.get("/api/v1/tenant/stats", headers=owner.headers).json()
    assert empty["agents"] == 0 and empty["messages"] == 0 and empty["members"] == 1
    agent = create_agent(client, owner)
    create_key(client, owner, agent["id"])
    revoked = create_key(client, owner, agent["id"])
    client.post(f"/api/v1/api-keys/{revoked['id']}/revoke", headers=owner.headers)
    seed_history(owner, agent["id"], messages=4)
    stats = client.get("/api/v1/tenant/stats", headers=owner.headers).json()
    # The tenant's own limits (the settings' defaults: no override) and today's usage against them.
    assert stats.pop("limits") == {
        "messages_per_minute": 1200,
        "agent_messages_per_minute": 600,
        "connections": 1000,
        "tokens_per_day": 0,
        "requests_per_minute": 600,
    }
    usage = stats.pop("usage")
    assert usage["tokens"] == 15 and usage["llm_calls"] == 1 and usage["connections"] == 0
    assert usage["messages_in"] + usage["messages_out"] == 4
    assert stats == {
        "agents": 1,
        "api_keys": 2,
        "active_api_keys": 1,
        "members": 1,
        "chat_streams": 1,
        "messages": 4,
        "memories": 1,
        "llm_calls": 1,
        "llm_prompt_tokens": 10,
        "llm_completion_tokens": 5,
        "llm_errors": 0,
    }


def test_delete_tenant_removes_everything_and_leaves_others(client, owner):
    bystander = register(client)
    other_agent = create_agent(client, bystander)
    seed_history(bystander, other_agent["id"])
    before = client.get("/api/v1/tenant/stats", headers=bystander.headers).json()

    agent = create_agent(client, owner)
    create_key(client, owner, agent["id"])
    seed_history(owner, agent["id"], messages=2)
    response = client.delete("/api/v1/tenant", headers=owner.headers)
    assert response.status_code == 200
    deleted = response.json()["deleted"]
    assert deleted["tenants"] == 1 and deleted["agents"] == 1 and deleted["api_keys"] == 1
    assert deleted["messages"] == 2 and deleted["memberships"] == 1
    assert client.get("/api/v1/tenant", headers=owner.headers).status_code == 401
    assert client.get("/api/v1/tenant/stats", headers=bystander.headers).json() == before


def test_roles(client, owner):
    admin = member_of(client, owner, "admin")
    member = member_of(client, owner, "member")
    agent = create_agent(client, owner)

    # members read everything of the tenant ...
    for path in (
        "/api/v1/tenant",
        "/api/v1/tenant/stats",
        "/api/v1/agents",
        f"/api/v1/agents/{agent['id']}",
        f"/api/v1/agents/{agent['id']}/api-keys",
        "/api/v1/agent-templates",
    ):
        assert client.get(path, headers=member.headers).status_code == 200, path
    # ... but change nothing
    forbidden = [
        ("patch", "/api/v1/tenant", {"name": "x"}),
        ("delete", "/api/v1/tenant", None),
        ("post", "/api/v1/agents", {"name": "m"}),
        ("patch", f"/api/v1/agents/{agent['id']}", {"name": "m"}),
        ("delete", f"/api/v1/agents/{agent['id']}", None),
        ("post", f"/api/v1/agents/{agent['id']}/api-keys", {"name": "k"}),
        ("post", f"/api/v1/agents/{agent['id']}/memories", {"content": "c"}),
        ("delete", f"/api/v1/agents/{agent['id']}/history", None),
    ]
    for method, path, body in forbidden:
        response = client.request(method, path, json=body, headers=member.headers)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "forbidden"

    # admins manage agents, keys and the tenant's settings, but cannot delete the tenant
    assert client.patch("/api/v1/tenant", json={"name": "by admin"}, headers=admin.headers).status_code == 200
    key = create_key(client, admin, agent["id"])
    assert client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=member.headers).status_code == 403
    assert client.delete(f"/api/v1/api-keys/{key['id']}", headers=member.headers).status_code == 403
    assert client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=admin.headers).status_code == 200
    assert client.delete("/api/v1/tenant", headers=admin.headers).status_code == 403
    assert client.get("/api/v1/tenant", headers=owner.headers).status_code == 200


def test_role_change_applies_to_existing_tokens(client, owner):
    member = member_of(client, owner, "member")
    assert client.post("/api/v1/agents", json={"name": "x"}, headers=member.headers).status_code == 403
    Scoped(owner.ctx).memberships.set_role(member.account_id, "admin")
    assert client.post("/api/v1/agents", json={"name": "x"}, headers=member.headers).status_code == 201


def test_templates(client, owner):
    response = client.get("/api/v1/agent-templates", headers=owner.headers)
    assert response.status_code == 200
    ids = [t["id"] for t in response.json()["items"]]
    assert set(ids) == {
        "friendly_assistant",
        "professional_expert",
        "creative_companion",
        "caring_friend",
        "efficient_helper",
    }
    page = client.get("/api/v1/agent-templates?limit=2&offset=2", headers=owner.headers).json()
    assert [t["id"] for t in page["items"]] == ids[2:4] and page["next_offset"] == 4
    one = client.get("/api/v1/agent-templates/caring_friend", headers=owner.headers)
    assert one.status_code == 200 and one.json()["persona"]["personality"] == "empathetic and attentive"
    missing = client.get("/api/v1/agent-templates/no_such_template", headers=owner.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/api/v1/agent-templates").status_code == 401
