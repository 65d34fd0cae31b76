"""Fixtures for the configurator suite: one app on the session database, users made through the API."""

from __future__ import annotations

import pytest
from cfg_helpers import User, create_agent, make_settings, register
from fastapi.testclient import TestClient

from configurator.main import create_app


@pytest.fixture(scope="session")
def settings(provisioned):
    return make_settings(provisioned)


@pytest.fixture(scope="session")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="session")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def owner(client) -> User:
    return register(client, prefix="own")


@pytest.fixture
def agent(client, owner) -> dict:
    return create_agent(client, owner, template_id="friendly_assistant")
