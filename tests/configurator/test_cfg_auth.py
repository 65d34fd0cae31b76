"""Registration, login, refresh rotation, logout, /me, and every way a token can be refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cfg_helpers import PASSWORD, TEST_SECRET, User, login, make_settings, member_of, register, unique

from configurator.core.security import ACCESS, REFRESH
from isolation import Scoped


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_register_returns_account_tenant_and_working_tokens(client):
    username = unique("reg")
    response = client.post(
        "/api/v1/auth/register",
        json={"username": username, "email": f"{username}@Example.com", "password": PASSWORD, "tenant_name": "Acme"},
    )
    assert response.status_code == 201
    data = response.json()
    assert data["account"]["username"] == username
    assert data["account"]["email"] == f"{username}@example.com"
    assert "password" not in response.text and "password_hash" not in response.text
    assert data["tenant"]["name"] == "Acme" and data["tenant"]["type"] == "personal"
    assert data["role"] == "owner"
    assert data["tokens"]["token_type"] == "bearer"
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {data['tokens']['access_token']}"})
    assert me.status_code == 200
    assert me.json()["account"]["id"] == data["account"]["id"]
    assert me.json()["tenant"]["id"] == data["tenant"]["id"]
    assert me.json()["memberships"] == [{"tenant_id": data["tenant"]["id"], "role": "owner"}]


def test_register_default_tenant_name(client):
    user = register(client)
    tenant = client.get("/api/v1/tenant", headers=user.headers).json()
    assert tenant["name"] == f"{user.username}'s workspace"


@pytest.mark.parametrize("field", ["username", "email"])
def test_register_duplicate_username_or_email_is_409(client, field):
    user = register(client)
    other = unique("dup")
    body = {"username": other, "email": f"{other}@example.com", "password": PASSWORD}
    body[field] = user.username if field == "username" else user.email
    _error(client.post("/api/v1/auth/register", json=body), 409, "conflict")


@pytest.mark.parametrize(
    "body",
    [
        {"username": "ab", "email": "ab@example.com", "password": PASSWORD},
        {"username": "good_name", "email": "not-an-email", "password": PASSWORD},
        {"username": "good_name", "email": "g@example.com", "password": "short"},
        {"username": "bad name!", "email": "g@example.com", "password": PASSWORD},
        {"username": "good_name", "email": "g@example.com"},
        {"username": "good_name", "email": "g@example.com", "password": PASSWORD, "role": "admin"},
    ],
)
def test_register_validation_is_422(client, body):
    error = _error(client.post("/api/v1/auth/register", json=body), 422, "validation_error")
    assert error["details"]
    assert PASSWORD not in str(error)


def test_login_by_username_and_by_email(client):
    user = register(client)
    by_name = login(client, user.username)
    by_email = login(client, user.email.upper())
    for data in (by_name, by_email):
        assert data["account"]["id"] == user.account_id
        assert data["tenant"]["id"] == user.tenant_id
        assert data["role"] == "owner"


def test_login_wrong_password_and_unknown_user_look_the_same(client):
    user = register(client)
    wrong = client.post("/api/v1/auth/login", json={"username": user.username, "password": "nope-nope"})
    unknown = client.post("/api/v1/auth/login", json={"username": unique("ghost"), "password": "nope-nope"})
    assert _error(wrong, 401, "unauthorized") == _error(unknown, 401, "unauthorized")
    assert wrong.headers["www-authenticate"].startswith("Bearer")


def test_login_rate_limit_gives_429_with_retry_after(client):
    user = register(client)
    for _ in range(5):
        _error(
            client.post("/api/v1/auth/login", json={"username": user.username, "password": "wrong-pass"}),
            401,
            "unauthorized",
        )
    limited = client.post("/api/v1/auth/login", json={"username": user.username, "password": PASSWORD})
    error = _error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert error["details"]["retry_after"] == int(limited.headers["retry-after"])
    # Another username from the same address is not affected.
    other = register(client)
    login(client, other.username)


def test_login_into_a_chosen_tenant_and_not_into_a_foreign_one(client, owner):
    member = member_of(client, owner, "member")
    assert login(client, member.username, tenant_id=owner.tenant_id)["role"] == "member"
    stranger = register(client)
    response = client.post(
        "/api/v1/auth/login",
        json={"username": member.username, "password": PASSWORD, "tenant_id": stranger.tenant_id},
    )
    _error(response, 403, "forbidden")


def test_login_without_any_tenant_is_403(client):
    user = register(client)
    assert client.delete("/api/v1/tenant", headers=user.headers).status_code == 200
    _error(client.post("/api/v1/auth/login", json={"username": user.username, "password": PASSWORD}), 403, "forbidden")


def test_refresh_rotates_and_reuse_fails(client):
    user = register(client)
    first = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert first.status_code == 200
    pair = first.json()
    assert pair["refresh_token"] != user.refresh_token
    assert client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {pair['access_token']}"}).status_code == 200
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token}), 401, "unauthorized")
    # Reusing a rotated token revokes the whole family: the newest refresh token is dead too.
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}), 401, "unauthorized")


def test_access_token_is_not_a_refresh_token_and_vice_versa(client):
    user = register(client)
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": user.access_token}), 401, "unauthorized")
    bad = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {user.refresh_token}"})
    _error(bad, 401, "unauthorized")


def test_logout_revokes_the_refresh_token(client):
    user = register(client)
    assert client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token}).status_code == 204
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token}), 401, "unauthorized")


def test_logout_all_sessions(client):
    user = register(client)
    second = login(client, user.username)["tokens"]["refresh_token"]
    response = client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token, "all_sessions": True})
    assert response.status_code == 204
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": second}), 401, "unauthorized")


def test_logout_with_garbage_is_401(client):
    _error(client.post("/api/v1/auth/logout", json={"refresh_token": "x.y.z"}), 401, "unauthorized")


def _session_of(user: User) -> str:
    return jwt.decode(user.access_token, options={"verify_signature": False})["sid"]


def _forge(user: User, kind: str = ACCESS, *, key: str = TEST_SECRET, **changes) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": user.account_id,
        "tid": user.tenant_id,
        "sid": _session_of(user),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": "forged",
        "iss": "maitenant-configurator",
        "aud": "maitenant-api" if kind == ACCESS else "maitenant-refresh",
        "typ": kind,
    }
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="HS256")


def test_forged_token_with_the_right_key_works(client):
    """Control for the refusals below: the forging helper builds tokens the API accepts."""
    user = register(client)
    response = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {_forge(user)}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not-bearer",
        "malformed",
        "expired",
        "wrong-audience",
        "wrong-issuer",
        "wrong-key",
        "no-tid",
        "no-exp",
        "no-sid",
        "other-sid",
        "wrong-typ",
        "alg-none",
        "foreign-tenant",
    ],
)
def test_bad_tokens_are_401_with_www_authenticate(client, case):
    user = register(client)
    now = int(time.time())
    headers = {
        "missing": {},
        "not-bearer": {"Authorization": f"Basic {user.access_token}"},
        "malformed": {"Authorization": "Bearer not.a.jwt"},
        "expired": {"Authorization": f"Bearer {_forge(user, iat=now - 3600, exp=now - 60)}"},
        "wrong-audience": {"Authorization": f"Bearer {_forge(user, aud='someone-else')}"},
        "wrong-issuer": {"Authorization": f"Bearer {_forge(user, iss='evil')}"},
        "wrong-key": {"Authorization": f"Bearer {_forge(user, key='another-secret-key-of-sufficient-length!!')}"},
        "no-tid": {"Authorization": f"Bearer {_forge(user, tid=None)}"},
        "no-exp": {"Authorization": f"Bearer {_forge(user, exp=None)}"},
        "no-sid": {"Authorization": f"Bearer {_forge(user, sid=None)}"},
        "other-sid": {"Authorization": f"Bearer {_forge(user, sid='never-signed-in')}"},
        "wrong-typ": {"Authorization": f"Bearer {_forge(user, typ=REFRESH)}"},
        "alg-none": {"Authorization": "Bearer " + jwt.encode({"sub": user.account_id}, None, algorithm="none")},
        "foreign-tenant": {"Authorization": f"Bearer {_forge(user, tid=register(client).tenant_id)}"},
    }[case]
    response = client.get("/api/v1/agents", headers=headers)
    _error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_token_stops_working_when_membership_is_removed(client, owner):
    member = member_of(client, owner, "member")
    assert client.get("/api/v1/agents", headers=member.headers).status_code == 200
    Scoped(owner.ctx).memberships.delete(member.account_id)
    _error(client.get("/api/v1/agents", headers=member.headers), 401, "unauthorized")
    _error(client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}), 401, "unauthorized")


def test_password_rehash_on_login_when_parameters_change(client, provisioned, settings):
    """Hashes made with old Argon2 parameters are upgraded at the next successful login."""
    from fastapi.testclient import TestClient

    from configurator.main import create_app
    from isolation import system

    user = register(client)
    assert ",t=1," in system.find_account_for_login(user.username)[1]
    stronger = create_app(make_settings(provisioned, password_hash_time_cost=2))
    with TestClient(stronger) as other:
        assert login(other, user.username)["account"]["id"] == user.account_id
    assert ",t=2," in system.find_account_for_login(user.username)[1]
    # The original app (cost 1) still verifies the upgraded hash.
    assert login(client, user.username)["account"]["id"] == user.account_id
