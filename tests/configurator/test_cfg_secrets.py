"""Passwords, API-key secrets and LLM provider keys never reach logs, nor any response after creation."""

from __future__ import annotations

import logging

from cfg_helpers import unique


def test_secrets_stay_out_of_logs_and_later_responses(client, caplog):
    caplog.set_level(logging.DEBUG)  # everything, peewee's SQL logging included
    password = "pw-" + unique("Secret")
    provider_key = "sk-" + unique("Provider")
    username = unique("sec")
    responses = []

    registered = client.post(
        "/api/v1/auth/register", json={"username": username, "email": f"{username}@example.com", "password": password}
    )
    assert registered.status_code == 201
    headers = {"Authorization": f"Bearer {registered.json()['tokens']['access_token']}"}
    responses.append(registered)
    # a failed login logs nothing secret either
    responses.append(client.post("/api/v1/auth/login", json={"username": username, "password": password + "x"}))
    responses.append(client.post("/api/v1/auth/login", json={"username": username, "password": password}))
    agent = client.post(
        "/api/v1/agents", json={"name": "s", "llm": {"provider": "openai", "api_key": provider_key}}, headers=headers
    )
    assert agent.status_code == 201
    responses.append(agent)
    created = client.post(f"/api/v1/agents/{agent.json()['id']}/api-keys", json={"name": "k"}, headers=headers)
    assert created.status_code == 201
    secret = created.json()["secret"]
    agent_id = agent.json()["id"]
    responses += [
        client.get("/api/v1/agents", headers=headers),
        client.get(f"/api/v1/agents/{agent_id}", headers=headers),
        client.patch(f"/api/v1/agents/{agent_id}", json={"description": "d"}, headers=headers),
        client.get(f"/api/v1/agents/{agent_id}/api-keys", headers=headers),
        client.post(f"/api/v1/api-keys/{created.json()['id']}/revoke", headers=headers),
        client.get("/api/v1/auth/me", headers=headers),
        client.get("/api/v1/tenant", headers=headers),
        client.get("/api/v1/tenant/stats", headers=headers),
        # validation errors must not echo the secret input back
        client.post("/api/v1/agents", json={"name": "", "llm": {"api_key": provider_key}}, headers=headers),
        client.post("/api/v1/auth/register", json={"username": "x", "email": "bad", "password": password}),
        client.patch(
            f"/api/v1/agents/{agent_id}", json={"llm": {"api_key": provider_key, "temperature": 99}}, headers=headers
        ),
    ]
    assert any(r.name.startswith("peewee") for r in caplog.records), "SQL logging was not captured"
    for value in (password, provider_key, secret):
        assert value not in caplog.text
        for response in responses:
            assert value not in response.text, (response.request.url, value)
    # The one response that shows the key secret is its creation.
    assert secret in created.text
