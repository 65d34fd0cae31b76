"""Size limits of stored JSON: tenant settings and agent persona/config/llm (MAX_SETTINGS_BYTES)."""

from __future__ import annotations

import pytest
from cfg_helpers import create_agent, make_settings, register
from fastapi.testclient import TestClient

from configurator.core.sizes import json_size
from configurator.main import create_app

LIMIT = 64 * 1024  # the default


@pytest.fixture(scope="module")
def roomy(provisioned):
    """An app whose request bodies may be 1 MiB (the default), so the settings limit is what refuses."""
    with TestClient(create_app(make_settings(provisioned, max_body_bytes=1024 * 1024))) as client:
        yield client, register(client)


def _too_large(response, field: str) -> None:
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "validation_error" and f"at most {LIMIT}" in error["message"]
    assert error["details"][0]["loc"] == ["body", field]


def test_tenant_settings_above_the_limit_are_422(roomy):
    """Before: PATCH /tenant stored 0.9 MB of settings (finding 6)."""
    client, owner = roomy
    before = client.get("/api/v1/tenant", headers=owner.headers).json()["settings"]
    huge = {"blob": "x" * 900_000}
    _too_large(client.patch("/api/v1/tenant", json={"settings": huge}, headers=owner.headers), "settings")
    assert client.get("/api/v1/tenant", headers=owner.headers).json()["settings"] == before


def test_tenant_settings_at_the_limit_are_stored_and_unicode_counts_in_bytes(roomy):
    client, owner = roomy
    room = LIMIT - json_size({"k": ""})
    exact = {"k": "x" * room}
    assert json_size(exact) == LIMIT
    response = client.patch("/api/v1/tenant", json={"settings": exact}, headers=owner.headers)
    assert response.status_code == 200 and response.json()["settings"] == exact
    # Four bytes per character in UTF-8: a quarter as many characters already exceed the limit.
    emoji = {"k": "\U0001f600" * (room // 4 + 1)}
    _too_large(client.patch("/api/v1/tenant", json={"settings": emoji}, headers=owner.headers), "settings")
    assert client.patch("/api/v1/tenant", json={"name": "renamed"}, headers=owner.headers).status_code == 200


def _big_persona() -> dict:
    """Every field at its schema maximum, in 4-byte characters: about 110 KB of JSON."""
    wide = "\U0001f600"
    return {
        "personality": wide * 2000,
        "reply_style": wide * 2000,
        "plan_style": wide * 2000,
        "private_plan_style": wide * 2000,
        "interests": [wide * 200] * 50,
        "states": [wide * 200] * 50,
    }


def test_agent_persona_above_the_limit_is_422_on_create_and_update(roomy):
    client, owner = roomy
    persona = _big_persona()
    assert json_size(persona) > LIMIT
    _too_large(
        client.post("/api/v1/agents", json={"name": "big", "persona": persona}, headers=owner.headers), "persona"
    )
    agent = create_agent(client, owner, persona={"personality": "calm"})
    patched = client.patch(f"/api/v1/agents/{agent['id']}", json={"persona": persona}, headers=owner.headers)
    _too_large(patched, "persona")
    kept = client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).json()
    assert kept["persona"]["personality"] == "calm" and kept["version"] == agent["version"]
    ok = client.patch(
        f"/api/v1/agents/{agent['id']}", json={"config": {"mood": {"enabled": True}}}, headers=owner.headers
    )
    assert ok.status_code == 200


def test_a_smaller_configured_limit_applies_to_every_section(provisioned):
    app = create_app(make_settings(provisioned, max_settings_bytes=1024))
    with TestClient(app) as client:
        owner = register(client)
        body = {"name": "wordy", "persona": {"personality": "p" * 1100}}
        response = client.post("/api/v1/agents", json=body, headers=owner.headers)
        assert response.status_code == 422 and "at most 1024" in response.json()["error"]["message"]
        assert create_agent(client, owner, persona={"personality": "p" * 500})["persona"]["personality"] == "p" * 500


def test_json_size_counts_what_is_stored_and_takes_any_json(client, owner):
    assert json_size({"a": "é"}) == len('{"a":"é"}'.encode())
    huge_int = {"n": 10**40}  # beyond 64 bits: still JSON, still stored
    assert json_size(huge_int) == len('{"n":' + str(10**40) + "}")
    response = client.patch("/api/v1/tenant", json={"settings": huge_int}, headers=owner.headers)
    assert response.status_code == 200 and response.json()["settings"] == huge_int
