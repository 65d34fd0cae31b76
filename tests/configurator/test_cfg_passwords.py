"""The password policy of registration: minimum length, the bundled common-password list, not one's own name."""

from __future__ import annotations

from importlib import resources

import pytest
from cfg_helpers import PASSWORD, make_settings, unique
from fastapi.testclient import TestClient

from configurator.core.passwords import COMMON_PASSWORDS, common_passwords, password_problem
from configurator.main import create_app
from isolation import system


def _register(client, password: str, username: str | None = None, email: str | None = None):
    username = username or unique("pw")
    email = email or f"{username}@example.com"
    return client.post("/api/v1/auth/register", json={"username": username, "email": email, "password": password})


def _refused(response, fragment: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and fragment in error["message"]
    assert error["details"] == [{"loc": ["body", "password"], "msg": error["message"], "type": "password_policy"}]


@pytest.mark.parametrize("password", ["password", "password123", "qwertyuiop", "1234567890", "Basketball", "ILOVEYOU1"])
def test_common_passwords_are_refused(client, password):
    """Before: `password` itself was accepted (finding 6)."""
    response = _register(client, password)
    if len(password) < 10:
        _refused(response, "at least 10 characters")
    else:
        _refused(response, "too common")


def test_short_passwords_are_refused_with_the_configured_minimum(client, provisioned):
    _refused(_register(client, "Xk3#pq9Lm"), "at least 10 characters")  # 9 characters
    assert _register(client, "Xk3#pq9Lm2").status_code == 201
    longer = create_app(make_settings(provisioned, password_min_length=16))
    with TestClient(longer) as other:
        _refused(_register(other, "Xk3#pq9Lm2ab"), "at least 16 characters")


@pytest.mark.parametrize("which", ["username", "email", "local-part"])
def test_the_username_or_email_as_password_is_refused(client, which):
    username = unique("samename")
    email = f"{username}.mail@example.com"
    password = {"username": username.upper(), "email": email, "local-part": f"{username}.mail"}[which]
    response = _register(client, password, username=username, email=email)
    _refused(response, "username or email")
    assert system.find_account_for_login(username) is None


def test_a_good_password_is_accepted_and_the_password_never_echoed(client):
    response = _register(client, PASSWORD)
    assert response.status_code == 201
    refused = _register(client, "password1234")
    assert "password1234" not in refused.text


def test_the_bundled_list_ships_with_the_package_and_has_no_short_entries():
    path = resources.files("configurator").joinpath("resources", COMMON_PASSWORDS)
    assert path.is_file()
    listed = common_passwords()
    assert len(listed) > 5000
    assert min(len(p) for p in listed) >= 8  # shorter ones are refused by length (PASSWORD_MIN_LENGTH >= 8)
    assert all(p == p.lower() for p in listed)
    assert resources.files("configurator").joinpath("resources", "common-passwords.LICENSE").is_file()


def test_password_problem_directly():
    kwargs = {"min_length": 10, "username": "alice", "email": "alice@example.com"}
    assert password_problem("correct horse battery", **kwargs) is None
    assert password_problem("  Alice@Example.com ", **kwargs) == "password must not be the username or email"
    assert "too common" in password_problem("PASSWORD123", **kwargs)
    assert "at least 10" in password_problem("short", **kwargs)
