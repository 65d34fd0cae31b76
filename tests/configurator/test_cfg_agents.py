"""Agents and API keys: templates, validation, versioning, write-only secrets, pagination."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cfg_helpers import create_agent, create_key, unique

from isolation import Scoped, system
from isolation.crypto import decrypt_secret


def test_create_from_template_fills_defaults_and_overrides(client, owner):
    template = system.get_template("professional_expert")
    agent = create_agent(
        client,
        owner,
        template_id="professional_expert",
        persona={"personality": "dry humour"},
        config={"chat": {"max_context_size": 5}},
    )
    assert agent["template_id"] == "professional_expert"
    assert agent["persona"]["personality"] == "dry humour"
    assert agent["persona"]["reply_style"] == template["persona"]["reply_style"]
    assert agent["config"]["chat"]["max_context_size"] == 5
    assert agent["config"]["chat"]["reply_mode"] == template["config"]["chat"]["reply_mode"]
    assert agent["config"]["mood"] == template["config"]["mood"]
    assert agent["version"] == 1 and agent["status"] == "active"
    assert agent["llm"]["provider"] == "default" and agent["has_api_key"] is False


def test_create_without_template_uses_model_defaults(client, owner):
    agent = create_agent(client, owner, description="plain")
    assert agent["template_id"] is None
    assert agent["persona"]["personality"] == "friendly and helpful"
    assert agent["config"]["chat"]["max_context_size"] == 20


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 101},
        {"name": "ok", "persona": {"state_probability": 2}},
        {"name": "ok", "persona": {"unknown": 1}},
        {"name": "ok", "config": {"chat": {"reply_mode": "sometimes"}}},
        {"name": "ok", "llm": {"provider": "mystery"}},
        {"name": "ok", "llm": {"temperature": 9}},
        {"name": "ok", "llm": {"base_url": "not a url"}},
        {"name": "ok", "template_id": "no_such_template"},
        {"name": "ok", "status": "deleted"},
        {"name": "ok", "version": 7},
        {"name": "ok", "tenant_id": "ten_someone_else"},
    ],
)
def test_create_validation(client, owner, body):
    response = client.post("/api/v1/agents", json=body, headers=owner.headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_duplicate_agent_name_is_409_but_other_tenants_may_reuse_it(client, owner):
    from cfg_helpers import register

    create_agent(client, owner, name="Shared name")
    response = client.post("/api/v1/agents", json={"name": "Shared name"}, headers=owner.headers)
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    create_agent(client, register(client), name="Shared name")


def test_update_bumps_version_and_merges(client, owner, agent):
    response = client.patch(
        f"/api/v1/agents/{agent['id']}",
        json={"persona": {"interests": ["tea"]}, "config": {"mood": {"enabled": False}}, "status": "disabled"},
        headers=owner.headers,
    )
    assert response.status_code == 200
    updated = response.json()
    assert updated["version"] == agent["version"] + 1
    assert updated["persona"]["interests"] == ["tea"]
    assert updated["persona"]["personality"] == agent["persona"]["personality"]
    assert updated["config"]["mood"]["enabled"] is False
    assert updated["config"]["chat"] == agent["config"]["chat"]
    assert updated["status"] == "disabled"
    assert Scoped(owner.ctx).agents.version(agent["id"]) == agent["version"] + 1
    again = client.patch(f"/api/v1/agents/{agent['id']}", json={"name": "renamed"}, headers=owner.headers).json()
    assert again["version"] == agent["version"] + 2 and again["name"] == "renamed"
    # An empty patch changes nothing, not even the version.
    same = client.patch(f"/api/v1/agents/{agent['id']}", json={}, headers=owner.headers).json()
    assert same["version"] == again["version"]


def test_update_validation_and_conflict(client, owner, agent):
    other = create_agent(client, owner)
    bad = client.patch(
        f"/api/v1/agents/{agent['id']}", json={"persona": {"state_probability": -1}}, headers=owner.headers
    )
    assert bad.status_code == 422
    clash = client.patch(f"/api/v1/agents/{agent['id']}", json={"name": other["name"]}, headers=owner.headers)
    assert clash.status_code == 409
    assert client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).json()["version"] == agent["version"]


def test_llm_api_key_is_write_only_and_encrypted(client, owner):
    provider_key = "sk-live-" + unique("k")
    agent = create_agent(
        client,
        owner,
        llm={"provider": "openai", "model": "gpt-x", "base_url": "https://llm.example.com/v1", "api_key": provider_key},
    )
    assert agent["has_api_key"] is True
    assert provider_key not in str(agent)
    stored = Scoped(owner.ctx).agents.encrypted_api_key(agent["id"])
    assert stored != provider_key and decrypt_secret(stored) == provider_key
    for response in (
        client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers),
        client.get("/api/v1/agents", headers=owner.headers),
        client.patch(f"/api/v1/agents/{agent['id']}", json={"llm": {"temperature": 0.2}}, headers=owner.headers),
    ):
        assert response.status_code == 200
        assert provider_key not in response.text and "llm_secret" not in response.text
        assert "encrypted_api_key" not in response.text
    kept = client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).json()
    assert kept["has_api_key"] is True and kept["llm"]["temperature"] == 0.2 and kept["llm"]["model"] == "gpt-x"
    # the key goes with the agent's own URL: without a key of its own the agent uses the operator's endpoint
    clear = {"llm": {"api_key": None, "base_url": None}}
    cleared = client.patch(f"/api/v1/agents/{agent['id']}", json=clear, headers=owner.headers)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["has_api_key"] is False
    assert Scoped(owner.ctx).agents.encrypted_api_key(agent["id"]) is None
    listed = client.get("/api/v1/agents", headers=owner.headers).json()["items"]
    assert [a["has_api_key"] for a in listed if a["id"] == agent["id"]] == [False]


def test_list_agents_paginates(client, owner):
    names = [create_agent(client, owner, name=f"p{i}")["name"] for i in range(5)]
    first = client.get("/api/v1/agents?limit=2", headers=owner.headers).json()
    assert [a["name"] for a in first["items"]] == names[:2] and first["next_offset"] == 2
    last = client.get("/api/v1/agents?limit=2&offset=4", headers=owner.headers).json()
    assert [a["name"] for a in last["items"]] == names[4:] and last["next_offset"] is None
    for query in ("limit=0", "limit=201", "offset=-1", "limit=abc"):
        response = client.get(f"/api/v1/agents?{query}", headers=owner.headers)
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


def test_delete_agent_removes_its_rows(client, owner, agent):
    from cfg_helpers import seed_history

    create_key(client, owner, agent["id"])
    seed_history(owner, agent["id"], messages=2)
    response = client.delete(f"/api/v1/agents/{agent['id']}", headers=owner.headers)
    assert response.status_code == 200
    assert response.json()["deleted"] == {
        "llm_usage": 1,
        "memories": 1,
        "messages": 2,
        "chat_streams": 1,
        "api_keys": 1,
        "agents": 1,
    }
    assert client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).status_code == 404
    assert client.delete(f"/api/v1/agents/{agent['id']}", headers=owner.headers).status_code == 404


def test_api_key_secret_shown_once(client, owner, agent):
    created = create_key(client, owner, agent["id"], name="bot")
    secret = created["secret"]
    assert secret.startswith("mtk_") and created["prefix"] == secret[: len(created["prefix"])]
    assert created["status"] == "active" and created["permissions"] == ["chat"]
    principal = system.lookup_api_key(secret)
    assert principal is not None and principal.agent_id == agent["id"] and principal.tenant_id == owner.tenant_id
    listed = client.get(f"/api/v1/agents/{agent['id']}/api-keys", headers=owner.headers)
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()["items"]] == [created["id"]]
    assert secret not in listed.text and "key_hash" not in listed.text and "secret" not in listed.text


def test_api_key_expiry_revoke_and_delete(client, owner, agent):
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    key = create_key(client, owner, agent["id"], expires_at=later)
    assert key["expires_at"].startswith(later[:16])
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    response = client.post(f"/api/v1/agents/{agent['id']}/api-keys", json={"expires_at": past}, headers=owner.headers)
    assert response.status_code == 422
    bad = client.post(f"/api/v1/agents/{agent['id']}/api-keys", json={"permissions": ["admin"]}, headers=owner.headers)
    assert bad.status_code == 422
    revoked = client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=owner.headers)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"]
    assert system.lookup_api_key(key["secret"]).refusal() == "api key revoked"
    again = client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=owner.headers)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert client.delete(f"/api/v1/api-keys/{key['id']}", headers=owner.headers).status_code == 204
    assert system.lookup_api_key(key["secret"]) is None
    assert client.delete(f"/api/v1/api-keys/{key['id']}", headers=owner.headers).status_code == 404
    assert client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=owner.headers).status_code == 404


def test_api_keys_of_missing_agent_are_404(client, owner):
    assert client.get("/api/v1/agents/agt_missing/api-keys", headers=owner.headers).status_code == 404
    assert client.post("/api/v1/agents/agt_missing/api-keys", json={}, headers=owner.headers).status_code == 404
