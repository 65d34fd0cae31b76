"""POST/PATCH /agents refuse LLM settings that would send requests, or the operator's key, where they must
not go (issue #10 findings 1 and 3): a clear 422 naming the field, and nothing stored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cfg_helpers import create_agent, unique

from isolation import Scoped
from isolation.egress import EgressSettings, get_egress_settings

OPERATOR_URL = "https://llm.operator.test/v1"


def _policy(**values) -> EgressSettings:
    base = {
        "llm_base_url": OPERATOR_URL,
        "llm_operator_key_urls": "",
        "llm_allowed_hosts": "",
        "llm_allow_private": False,
    }
    return EgressSettings(_env_file=None, **{**base, **values})


@pytest.fixture
def policy(app) -> Iterator[dict]:
    """The egress policy the app sees (FastAPI dependency override); tests may replace `["value"]`."""
    holder = {"value": _policy()}
    app.dependency_overrides[get_egress_settings] = lambda: holder["value"]
    yield holder
    app.dependency_overrides.pop(get_egress_settings, None)


def _post(client, owner, llm: dict):
    return client.post("/api/v1/agents", json={"name": unique("agent-"), "llm": llm}, headers=owner.headers)


def _refused(response, field: str, words: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert words in error["message"]
    assert error["details"][0]["loc"] == ["body", "llm", field]


@pytest.mark.parametrize(
    ("base_url", "words"),
    [
        ("http://169.254.169.254/latest", "link-local address"),  # cloud metadata
        ("http://127.0.0.1:8095/v1", "loopback address"),
        ("http://[::1]:8000/v1", "loopback address"),
        ("http://[::ffff:127.0.0.1]/v1", "loopback address"),
        ("http://10.0.0.5/v1", "private address"),
        ("http://0.0.0.0:8000/v1", "unspecified address"),
        ("http://localhost:8000/v1", "loopback address"),
        ("http://user:pass@llm.example.com/v1", "must not contain user info"),
        ("https://llm.example.com/v1?x=1", "must not contain a query"),
        ("http://llm.example.com/internal/admin?x=", "must not contain a query"),
        ("https://llm.example.com/v1#frag", "must not contain a fragment"),
    ],
)
def test_create_refuses_unsafe_base_urls(client, owner, policy, base_url, words):
    response = _post(client, owner, {"provider": "openai", "model": "m", "base_url": base_url, "api_key": "sk-own"})
    _refused(response, "base_url", words)
    assert Scoped(owner.ctx).agents.list() == []  # nothing stored


def test_create_refuses_a_scheme_other_than_http(client, owner, policy):
    response = _post(client, owner, {"provider": "openai", "model": "m", "base_url": "ftp://llm.example.com/v1"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("provider", ["openai", "default"])
def test_an_own_base_url_needs_an_own_key(client, owner, policy, provider):
    """Finding 1 at save time: the operator's key would otherwise be used for the tenant's URL."""
    response = _post(client, owner, {"provider": provider, "model": "m", "base_url": "https://api.example.com/v1"})
    _refused(response, "api_key", "must bring its own llm.api_key")
    assert Scoped(owner.ctx).agents.list() == []


def test_accepted_llm_settings(client, owner, policy):
    own = create_agent(
        client,
        owner,
        llm={"provider": "openai", "model": "m", "base_url": "https://api.example.com/v1", "api_key": "k"},
    )
    assert own["llm"]["base_url"] == "https://api.example.com/v1" and own["has_api_key"] is True
    # the operator's own endpoint needs no key of the agent's (the operator's may be sent there)
    operator = create_agent(client, owner, llm={"provider": "openai", "model": "m", "base_url": OPERATOR_URL + "/"})
    assert operator["has_api_key"] is False
    # an offline agent never calls its URL; no URL at all means the operator's endpoint
    create_agent(client, owner, llm={"provider": "offline", "base_url": "https://api.example.com/v1"})
    create_agent(client, owner, llm={"provider": "openai", "model": "m"})
    # names are not resolved when saving (the replier checks every connection): a name is accepted
    create_agent(
        client, owner, llm={"provider": "openai", "model": "m", "base_url": "http://rebind.test/v1", "api_key": "k"}
    )
    # private destinations the operator allowed
    policy["value"] = _policy(llm_allowed_hosts="127.0.0.1", llm_allow_private=True)
    create_agent(
        client, owner, llm={"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
    )
    create_agent(
        client, owner, llm={"provider": "openai", "model": "m", "base_url": "http://10.0.0.5/v1", "api_key": "k"}
    )


def test_patch_checks_the_merged_settings(client, owner, policy):
    agent = create_agent(
        client,
        owner,
        llm={"provider": "openai", "model": "m", "base_url": "https://api.example.com/v1", "api_key": "k"},
    )
    url = f"/api/v1/agents/{agent['id']}"
    # removing the key while keeping the URL would hand the URL the operator's key
    _refused(client.patch(url, json={"llm": {"api_key": None}}, headers=owner.headers), "api_key", "own llm.api_key")
    _refused(
        client.patch(url, json={"llm": {"base_url": "http://169.254.169.254/"}}, headers=owner.headers),
        "base_url",
        "link-local",
    )
    _refused(
        client.patch(url, json={"llm": {"base_url": "https://api.example.com/v1?x="}}, headers=owner.headers),
        "base_url",
        "query",
    )
    kept = client.get(url, headers=owner.headers).json()
    assert kept["version"] == agent["version"] and kept["has_api_key"] is True
    assert kept["llm"]["base_url"] == "https://api.example.com/v1"
    # changing only the temperature keeps the stored key: fine
    assert client.patch(url, json={"llm": {"temperature": 0.1}}, headers=owner.headers).status_code == 200
    # key and URL removed together: the agent uses the operator's endpoint
    both = client.patch(url, json={"llm": {"api_key": None, "base_url": None}}, headers=owner.headers)
    assert both.status_code == 200 and both.json()["has_api_key"] is False
    # an own URL again, still without a key
    again = client.patch(url, json={"llm": {"base_url": "https://api.example.com/v1"}}, headers=owner.headers)
    _refused(again, "api_key", "own llm.api_key")
    # an offline agent with a URL and no key may not be switched to a provider that would call it
    offline = create_agent(client, owner, llm={"provider": "offline", "base_url": "https://api.example.com/v1"})
    switch = client.patch(
        f"/api/v1/agents/{offline['id']}", json={"llm": {"provider": "openai"}}, headers=owner.headers
    )
    _refused(switch, "api_key", "own llm.api_key")
