"""Operators and per-tenant limits in the configurator: the operator API, suspension, requests per
tenant, and the tenant's own view of its limits and usage (`GET /tenant/stats`)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import pytest
from cfg_helpers import create_agent, create_key, make_settings, member_of, register, seed_history

from configurator.core.config import Settings
from configurator.core.tenant_limits import RestLimits
from isolation import IsolationContext, NotFound, Scoped
from isolation.limits import FixedWindowCounter
from isolation.operators import is_operator, operator_tenants, set_operator, tenant_controls

OP = "/api/v1/operator/tenants"


@pytest.fixture
def operator(client, provisioned):
    """A registered account marked as an operator the way `invoke create-operator` does (as the owner)."""
    user = register(client, prefix="op")
    marked = set_operator(provisioned.admin_url, user.username)
    assert marked["is_operator"] is True and marked["id"] == user.account_id
    return user


@pytest.fixture
def customer(client):
    """A tenant with content an operator must never see."""
    owner = register(client, prefix="cu", tenant_name="Customer Tenant")
    agent = create_agent(client, owner, name="secret-agent-name", persona={"personality": "secret persona text"})
    create_key(client, owner, agent["id"])
    seed_history(owner, agent["id"], messages=3)
    client.patch("/api/v1/tenant", json={"settings": {"secret_setting": "hidden"}}, headers=owner.headers)
    return owner


CONTENT = ("secret-agent-name", "secret persona text", "hello 0", "remembers the group", "secret_setting", "mtk_")


def _no_content(response) -> dict | list:
    text = response.text
    for needle in CONTENT:
        assert needle not in text, (needle, text)
    return response.json()


def test_operator_lists_tenants_and_reads_limits_and_usage_without_content(client, operator, customer):
    listed = _no_content(client.get(OP, headers=operator.headers))
    mine = next(t for t in listed if t["id"] == customer.tenant_id)
    assert mine["name"] == "Customer Tenant" and mine["status"] == "active"
    assert mine["overrides"] == dict.fromkeys(mine["limits"])  # nothing overridden yet
    assert mine["limits"]["requests_per_minute"] == 600

    limits = _no_content(client.get(f"{OP}/{customer.tenant_id}/limits", headers=operator.headers))
    assert limits["limits"] == limits["defaults"] and limits["window_seconds"] == 60

    usage = _no_content(client.get(f"{OP}/{customer.tenant_id}/usage", headers=operator.headers))
    assert usage["tokens"] == 15 and usage["llm_calls"] == 1 and usage["messages_in"] == 3
    assert usage["messages_out"] == 0 and usage["connections"] == 0
    assert set(usage) == {"since", "tokens", "llm_calls", "messages_in", "messages_out", "connections"}


def test_operator_sets_limits_and_the_tenant_sees_them(client, operator, customer):
    body = {"messages_per_minute": 5, "tokens_per_day": 0, "requests_per_minute": 100}
    response = client.put(f"{OP}/{customer.tenant_id}/limits", json=body, headers=operator.headers)
    assert response.status_code == 200, response.text
    data = _no_content(response)
    assert data["overrides"] == {**dict.fromkeys(data["limits"]), **body}
    assert data["limits"]["messages_per_minute"] == 5 and data["limits"]["agent_messages_per_minute"] == 600
    stats = client.get("/api/v1/tenant/stats", headers=customer.headers).json()
    assert stats["limits"] == data["limits"]
    assert stats["usage"]["tokens"] == 15
    # PUT replaces: what is left out goes back to the default.
    again = client.put(f"{OP}/{customer.tenant_id}/limits", json={"connections": 3}, headers=operator.headers)
    assert again.json()["overrides"]["messages_per_minute"] is None
    assert again.json()["limits"]["connections"] == 3
    assert tenant_controls([customer.tenant_id])[customer.tenant_id].overrides["connections"] == 3


@pytest.mark.parametrize(
    "body",
    [{"messages_per_minute": -1}, {"connections": "many"}, {"unknown_limit": 1}, {"tokens_per_day": 2**63}],
)
def test_invalid_limits_are_422_and_change_nothing(client, operator, customer, body):
    response = client.put(f"{OP}/{customer.tenant_id}/limits", json=body, headers=operator.headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"
    assert all(v is None for v in tenant_controls([customer.tenant_id])[customer.tenant_id].overrides.values())


def test_unknown_tenants_are_404_for_operators(client, operator):
    for method, path in [
        ("GET", f"{OP}/ten_zz_missing/limits"),
        ("PUT", f"{OP}/ten_zz_missing/limits"),
        ("POST", f"{OP}/ten_zz_missing/suspend"),
        ("POST", f"{OP}/ten_zz_missing/resume"),
        ("GET", f"{OP}/ten_zz_missing/usage"),
        ("GET", f"{OP}/not%20an%20id/usage"),
    ]:
        response = client.request(method, path, json={} if method == "PUT" else None, headers=operator.headers)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_suspension_403s_every_tenant_call_and_resume_restores_them(client, operator, customer):
    admin = member_of(client, customer, "admin")
    response = client.post(f"{OP}/{customer.tenant_id}/suspend", headers=operator.headers)
    assert response.status_code == 200 and _no_content(response)["status"] == "suspended"
    for user in (customer, admin):
        for method, path in [
            ("GET", "/api/v1/tenant"),
            ("GET", "/api/v1/tenant/stats"),
            ("GET", "/api/v1/agents"),
            ("POST", "/api/v1/agents"),
            ("GET", "/api/v1/auth/me"),
        ]:
            answer = client.request(
                method, path, json={"name": "x"} if method == "POST" else None, headers=user.headers
            )
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"] == {
                "code": "tenant_suspended",
                "message": "this tenant is suspended by the operator",
                "details": None,
            }
    # The operator's own calls do not depend on any tenant's status.
    assert client.get(f"{OP}/{customer.tenant_id}/usage", headers=operator.headers).status_code == 200
    assert client.post(f"{OP}/{customer.tenant_id}/resume", headers=operator.headers).json()["status"] == "active"
    assert client.get("/api/v1/agents", headers=customer.headers).status_code == 200


def test_non_operators_get_403_and_a_removed_mark_ends_access(client, provisioned, operator, customer):
    assert client.get(OP, headers=customer.headers).status_code == 403
    assert operator_tenants(customer.account_id) == []  # the database function refuses too
    assert is_operator(operator.account_id)
    set_operator(provisioned.admin_url, operator.username, False)
    response = client.get(OP, headers=operator.headers)
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    with pytest.raises(NotFound):
        set_operator(provisioned.admin_url, "no_such_account_name")


def test_operator_routes_need_a_live_session(client, operator):
    assert client.get(OP).status_code == 401
    client.post("/api/v1/auth/logout", json={"refresh_token": operator.refresh_token})
    response = client.get(OP, headers=operator.headers)
    assert response.status_code == 401


def test_the_application_role_cannot_make_operators(provisioned, client):
    """On PostgreSQL the application role may not write `accounts.is_operator` (column privileges)."""
    if provisioned.kind != "postgresql":
        pytest.skip("roles and column privileges exist on PostgreSQL only")
    from isolation.db import make_database

    user = register(client, prefix="np")
    db = make_database(provisioned.url, app_role=provisioned.app_role)
    try:
        with pytest.raises(Exception, match="permission denied"), db.atomic():
            db.execute_sql("UPDATE accounts SET is_operator = TRUE WHERE id = %s", (user.account_id,))
    finally:
        db.close_all()
    assert not is_operator(user.account_id)


# ---- requests per tenant ------------------------------------------------------------------------
@contextmanager
def _rest_limits(app, provisioned, **settings):
    """The session app with other request limits for the duration (read from app.state per request)."""
    saved = app.state.rest_limits
    app.state.rest_limits = RestLimits(make_settings(provisioned, **settings))
    try:
        yield
    finally:
        app.state.rest_limits = saved


def _wait_for_fresh_window(window: float) -> None:
    now = time.time()
    time.sleep(math.floor(now / window) * window + window - now + 0.02)


def test_requests_per_tenant_are_exact_429_with_retry_after_and_reset_at_the_window(app, client, provisioned):
    window = 2.0
    with _rest_limits(app, provisioned, tenant_requests_per_minute=4, limit_window_seconds=window):
        owner = register(client, prefix="rl")
        member = member_of(client, owner, "member")  # one budget for the whole tenant
        other = register(client, prefix="rl2")
        _wait_for_fresh_window(window)
        statuses = [client.get("/api/v1/agents", headers=u.headers).status_code for u in (owner, member) * 2]
        assert statuses == [200] * 4
        refused = client.get("/api/v1/tenant", headers=owner.headers)
        assert refused.status_code == 429
        error = refused.json()["error"]
        wait = int(refused.headers["retry-after"])
        assert error["code"] == "rate_limited" and 1 <= wait <= window
        assert error["details"] == {"limit": "requests_per_minute", "value": 4, "retry_after": wait}
        assert client.get("/api/v1/agents", headers=other.headers).status_code == 200  # other tenants unaffected
        _wait_for_fresh_window(window)
        assert client.get("/api/v1/agents", headers=owner.headers).status_code == 200


def test_an_operator_override_of_the_request_limit_applies_at_the_next_request(client, operator, customer):
    assert client.get("/api/v1/agents", headers=customer.headers).status_code == 200
    client.put(f"{OP}/{customer.tenant_id}/limits", json={"requests_per_minute": 1}, headers=operator.headers)
    codes = [client.get("/api/v1/agents", headers=customer.headers).status_code for _ in range(3)]
    assert 429 in codes and codes[-1] == 429
    client.put(f"{OP}/{customer.tenant_id}/limits", json={"requests_per_minute": 0}, headers=operator.headers)
    assert client.get("/api/v1/agents", headers=customer.headers).status_code == 200  # 0 = unlimited


def test_rest_limits_unit_counts_only_allowed_requests_and_logs_once(caplog):
    clock = [100.0]
    counter = FixedWindowCounter(clock=lambda: clock[0])
    settings = Settings.model_construct(tenant_requests_per_minute=2, limit_window_seconds=60.0)
    limits = RestLimits(settings, counter)
    limits.admit("ten_a", "active", None)
    limits.admit("ten_a", "active", None)
    with caplog.at_level("WARNING", "configurator"):
        for _ in range(3):
            with pytest.raises(Exception) as refused:
                limits.admit("ten_a", "active", None)
            assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "20"}
    assert sum("throttled" in r.getMessage() for r in caplog.records) == 1
    assert counter.count(("requests", "ten_a"), 60.0) == 2
    limits.admit("ten_a", "active", 10)  # an override above the default
    clock[0] = 120.0  # the next window
    limits.admit("ten_a", "active", None)
    with pytest.raises(Exception) as suspended:
        limits.admit("ten_a", "suspended", None)
    assert suspended.value.code == "tenant_suspended"


def test_operator_list_holds_every_tenant_oldest_first(client, operator, customer):
    listed = [t["id"] for t in client.get(OP, headers=operator.headers).json()]
    assert listed.index(operator.tenant_id) < listed.index(customer.tenant_id)
    assert Scoped(IsolationContext(customer.tenant_id)).tenant.get()["status"] == "active"
