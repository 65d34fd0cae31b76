"""With REDIS_URL the configurator tells every replier about key, agent and tenant changes (isolation/signals.py):
one event per committed change, ids only, on the deployment's channel; nothing for a refused change."""

from __future__ import annotations

import json
import time

import pytest
import redis
from cfg_helpers import PASSWORD, create_agent, create_key, make_settings, register
from fastapi.testclient import TestClient

from configurator.main import create_app
from isolation.operators import set_operator
from isolation.signals import NullPublisher, signals_channel
from testsupport.redis_server import require_redis, unique_prefix


@pytest.fixture(scope="module")
def signalling(provisioned):
    url = require_redis()
    prefix = unique_prefix()
    app = create_app(make_settings(provisioned, redis_url=url, redis_prefix=prefix))
    listener = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(signals_channel(prefix))
    with TestClient(app) as client:
        yield client, listener
    listener.close()
    app.state.signals.close()


def heard(listener, seconds: float = 2.0) -> list[dict]:
    """Every event published until a quiet `seconds`... or the first few after the action."""
    events, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = listener.get_message(timeout=0.1)
        if message is not None:
            events.append(json.loads(message["data"]))
            deadline = time.monotonic() + 0.3
    return events


def test_key_and_agent_changes_are_published_with_ids_only(signalling):
    client, listener = signalling
    owner = register(client, prefix="sig")
    agent = create_agent(client, owner, template_id="friendly_assistant")
    key = create_key(client, owner, agent["id"])
    assert heard(listener, 0.5) == []  # creating things needs no signal

    assert client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=owner.headers).status_code == 200
    assert heard(listener) == [{"kind": "key", "tenant_id": owner.tenant_id, "key_id": key["id"]}]

    other = create_key(client, owner, agent["id"])
    assert client.delete(f"/api/v1/api-keys/{other['id']}", headers=owner.headers).status_code == 204
    assert heard(listener) == [{"kind": "key", "tenant_id": owner.tenant_id, "key_id": other["id"]}]

    response = client.patch(f"/api/v1/agents/{agent['id']}", json={"name": "renamed"}, headers=owner.headers)
    assert response.status_code == 200
    agent_event = {"kind": "agent", "tenant_id": owner.tenant_id, "agent_id": agent["id"]}
    assert heard(listener) == [agent_event]
    # An empty patch changes nothing: no signal.
    assert client.patch(f"/api/v1/agents/{agent['id']}", json={}, headers=owner.headers).status_code == 200
    assert heard(listener, 0.5) == []

    assert client.delete(f"/api/v1/agents/{agent['id']}", headers=owner.headers).status_code == 200
    assert heard(listener) == [agent_event]
    assert key["secret"] not in json.dumps(agent_event)


def test_refused_changes_publish_nothing(signalling):
    client, listener = signalling
    owner = register(client, prefix="sig")
    stranger = register(client, prefix="sig")
    agent = create_agent(client, owner, template_id="friendly_assistant")
    key = create_key(client, owner, agent["id"])
    assert client.post(f"/api/v1/api-keys/{key['id']}/revoke", headers=stranger.headers).status_code == 404
    assert client.delete(f"/api/v1/agents/{agent['id']}", headers=stranger.headers).status_code == 404
    assert heard(listener, 0.5) == []


def test_without_redis_nothing_is_published(app):
    assert isinstance(app.state.signals, NullPublisher)
    assert app.state.signals.publish(None) is None


def test_tenant_changes_publish_a_tenant_signal(signalling, provisioned):
    """Limits, suspension and resumption by an operator, and a tenant deleted by its owner or with
    its only account: every replier must re-read that tenant (and close its connections) at once."""
    client, listener = signalling
    operator = register(client, prefix="sig")
    set_operator(provisioned.admin_url, operator.username)
    customer = register(client, prefix="sig")
    event = {"kind": "tenant", "tenant_id": customer.tenant_id}
    ops = f"/api/v1/operator/tenants/{customer.tenant_id}"
    response = client.put(f"{ops}/limits", json={"messages_per_minute": 5}, headers=operator.headers)
    assert response.status_code == 200
    assert heard(listener) == [event]
    assert client.post(f"{ops}/suspend", headers=operator.headers).status_code == 200
    assert heard(listener) == [event]
    assert client.post(f"{ops}/resume", headers=operator.headers).status_code == 200
    assert heard(listener) == [event]
    # Not an operator: refused, nothing published.
    assert client.post(f"{ops}/suspend", headers=customer.headers).status_code == 403
    assert heard(listener, 0.5) == []

    assert client.delete("/api/v1/tenant", headers=customer.headers).status_code == 200
    assert heard(listener) == [event]

    leaving = register(client, prefix="sig")
    response = client.request("DELETE", "/api/v1/auth/me", json={"password": PASSWORD}, headers=leaving.headers)
    assert response.status_code == 200, response.text
    assert heard(listener) == [{"kind": "tenant", "tenant_id": leaving.tenant_id}]
