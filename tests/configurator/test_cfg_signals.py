"""With REDIS_URL the configurator tells every replier about key and agent changes (isolation/signals.py):
one event per committed change, ids only, on the deployment's channel; nothing for a refused change."""

from __future__ import annotations

import json
import time

import pytest
import redis
from cfg_helpers import create_agent, create_key, make_settings, register
from fastapi.testclient import TestClient

from configurator.main import create_app
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
