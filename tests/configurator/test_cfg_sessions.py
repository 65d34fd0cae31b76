"""Sign-in sessions: logout ends the access tokens too, not only the refresh token.

Every login or registration starts a session (`sid` in both tokens, stored with each refresh token);
refresh keeps it; an access token works only while its session has a live refresh token.
"""

from __future__ import annotations

import jwt
from cfg_helpers import login, register

from configurator.core.security import ACCESS, REFRESH, TokenService
from isolation import Scoped
from isolation import db as isolation_db
from isolation.ids import utcnow
from isolation.models import RefreshToken


def _me(client, access_token: str) -> int:
    return client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {access_token}"}).status_code


def _sid(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["sid"]


def test_logout_ends_the_access_token_of_the_session_at_once(client):
    """Before sessions, an access token kept working after logout until it expired (15 minutes)."""
    user = register(client)
    assert _me(client, user.access_token) == 200
    assert client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token}).status_code == 204
    response = client.get("/api/v1/agents", headers=user.headers)
    assert response.status_code == 401
    assert "session ended" in response.json()["error"]["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert _me(client, user.access_token) == 401


def test_logout_ends_only_its_own_session(client):
    user = register(client)
    other = login(client, user.username)["tokens"]
    assert _sid(other["access_token"]) != _sid(user.access_token)
    assert client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token}).status_code == 204
    assert _me(client, user.access_token) == 401
    assert _me(client, other["access_token"]) == 200
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 200


def test_logout_all_sessions_ends_every_access_token_of_the_account_in_the_tenant(client):
    user = register(client)
    second = login(client, user.username)["tokens"]
    third = login(client, user.email)["tokens"]
    response = client.post("/api/v1/auth/logout", json={"refresh_token": second["refresh_token"], "all_sessions": True})
    assert response.status_code == 204
    for access in (user.access_token, second["access_token"], third["access_token"]):
        assert _me(client, access) == 401
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": third["refresh_token"]}).status_code == 401
    # Signing in again starts a fresh session that works.
    assert _me(client, login(client, user.username)["tokens"]["access_token"]) == 200


def test_rotation_keeps_the_session_and_logout_with_the_newest_token_ends_it(client):
    user = register(client)
    pair = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token}).json()
    assert _sid(pair["access_token"]) == _sid(pair["refresh_token"]) == _sid(user.access_token)
    assert _me(client, pair["access_token"]) == 200
    assert _me(client, user.access_token) == 200  # same session, not logged out: valid until it expires
    again = client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}).json()
    assert _me(client, again["access_token"]) == 200
    assert client.post("/api/v1/auth/logout", json={"refresh_token": again["refresh_token"]}).status_code == 204
    for access in (user.access_token, pair["access_token"], again["access_token"]):
        assert _me(client, access) == 401


def test_reuse_of_a_rotated_refresh_token_ends_the_access_tokens_too(client):
    """A stolen refresh token replayed after the owner rotated it: every session of the account in
    the tenant is revoked, and so are their access tokens (the thief's included)."""
    user = register(client)
    thief = client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token}).json()
    assert _me(client, thief["access_token"]) == 200
    assert client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token}).status_code == 401
    assert _me(client, thief["access_token"]) == 401
    assert _me(client, user.access_token) == 401


def test_an_expired_session_ends_its_access_tokens(client):
    """The session check is on live refresh tokens: expiry counts like revocation."""
    user = register(client)
    jti = jwt.decode(user.refresh_token, options={"verify_signature": False})["jti"]
    assert Scoped(user.ctx).refresh_tokens.get(jti)["session_id"] == _sid(user.access_token)
    with isolation_db.unit_of_work(user.tenant_id, write=True):
        expired = (
            RefreshToken.update(expires_at=utcnow())
            .where((RefreshToken.tenant_id == user.tenant_id) & (RefreshToken.jti == jti))
            .execute()
        )
    assert expired == 1
    assert _me(client, user.access_token) == 401


def test_impossible_session_ids_are_401_not_database_errors(client, settings):
    """A correctly signed token whose `sid` could never be ours is refused before any SQL."""
    user = register(client)
    tokens = TokenService(settings)
    bad = "sid with spaces!"
    access = tokens.issue(ACCESS, user.account_id, user.tenant_id, session_id=bad).token
    response = client.get("/api/v1/agents", headers={"Authorization": f"Bearer {access}"})
    assert response.status_code == 401 and response.json()["error"]["message"] == "invalid token"
    refresh = tokens.issue(REFRESH, user.account_id, user.tenant_id, session_id=bad).token
    response = client.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
    assert response.status_code == 401 and response.json()["error"]["message"] == "refresh token no longer valid"
    response = client.post("/api/v1/auth/logout", json={"refresh_token": refresh})
    assert response.status_code == 401 and response.json()["error"]["message"] == "invalid token"
    assert _me(client, user.access_token) == 200
