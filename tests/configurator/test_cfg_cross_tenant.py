"""Automatic cross-tenant matrix: every route with a path id, every method, called by tenant B with
tenant A's ids, must answer 404 exactly like a missing id, and leave A's data unchanged.

Routes are discovered from `app.routes`, so a new route is covered without editing this test; a route
whose path parameter this test cannot fill in makes it fail.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass

import pytest
from cfg_helpers import create_agent, create_key, member_of, register, seed_history
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from pydantic import BaseModel

# Path parameters naming catalogue rows that are the same for every tenant (not tenant data).
GLOBAL_PARAMS = {"template_id"}
# Operator-only routes take any tenant's id by design; for tenant members they answer 403 whatever the
# id (`test_operator_routes_refuse_every_tenant_member`), so the 404 matrix leaves them out.
OPERATOR_PREFIX = "/api/v1/operator/"


def _sample(annotation):
    """A minimal valid value for a required request field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin is typing.Annotated:
        return _sample(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return typing.get_args(annotation)[0]
    if annotation is str:
        return "matrix"
    if annotation is bool:
        return False
    if annotation in (int, float):
        return 1
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return minimal_body(annotation)
    raise AssertionError(f"no sample value for required field type {annotation!r}: extend _sample")


def minimal_body(model: type[BaseModel]) -> dict:
    return {name: _sample(f.annotation) for name, f in model.model_fields.items() if f.is_required()}


def _body_for(route: APIRoute) -> dict | None:
    if route.body_field is None:
        return None
    model = route.body_field.field_info.annotation
    return minimal_body(model) if isinstance(model, type) and issubclass(model, BaseModel) else {}


@pytest.fixture
def tenant_a(client):
    owner = register(client, prefix="ta")
    agent = create_agent(client, owner, template_id="caring_friend", llm={"api_key": "sk-a"})
    key = create_key(client, owner, agent["id"])
    seeded = seed_history(owner, agent["id"], messages=3)
    memory = client.post(f"/api/v1/agents/{agent['id']}/memories", json={"content": "A's"}, headers=owner.headers)
    ids = {
        "agent_id": agent["id"],
        "key_id": key["id"],
        "stream_id": seeded["stream"]["id"],
        "memory_id": memory.json()["id"],
    }
    return owner, ids


def snapshot(client, owner, ids) -> dict:
    """A's data as A sees it through the API."""
    get = lambda path: client.get(path, headers=owner.headers).json()  # noqa: E731
    return {
        "tenant": get("/api/v1/tenant"),
        "stats": get("/api/v1/tenant/stats"),
        "agent": get(f"/api/v1/agents/{ids['agent_id']}"),
        "keys": get(f"/api/v1/agents/{ids['agent_id']}/api-keys"),
        "streams": get(f"/api/v1/agents/{ids['agent_id']}/chat-streams"),
        "messages": get(f"/api/v1/chat-streams/{ids['stream_id']}/messages"),
        "memories": get(f"/api/v1/agents/{ids['agent_id']}/memories"),
    }


@dataclass(frozen=True)
class RouteInfo:
    path: str  # full path, prefixes included
    methods: frozenset[str]
    route: APIRoute


def all_routes(app) -> list[RouteInfo]:
    """Every API route of `app` with its full path (FastAPI >= 0.13x keeps included routers nested)."""
    iter_contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    if iter_contexts is None:  # older FastAPI: included routes are flattened into app.routes
        return [RouteInfo(r.path, frozenset(r.methods), r) for r in app.routes if isinstance(r, APIRoute)]
    return [
        RouteInfo(rc.path, frozenset(rc.methods or ()), rc.original_route)
        for rc in iter_contexts(app.routes)
        if isinstance(rc.original_route, APIRoute)
    ]


def id_routes(app) -> list[tuple[RouteInfo, list[str]]]:
    found = []
    for route in all_routes(app):
        if route.path.startswith(OPERATOR_PREFIX):
            continue
        params = re.findall(r"{(\w+)(?::\w+)?}", route.path)
        if params:
            found.append((route, params))
    return found


@pytest.mark.parametrize("caller_role", ["owner", "admin"])
def test_foreign_ids_are_404_on_every_route_and_method(client, app, tenant_a, caller_role):
    owner_a, ids = tenant_a
    owner_b = register(client, prefix="tb")
    caller = owner_b if caller_role == "owner" else member_of(client, owner_b, "admin")
    create_agent(client, owner_b)  # B has data of its own, so "no data" is not why it sees nothing
    before = snapshot(client, owner_a, ids)

    routes = id_routes(app)
    assert routes, "no routes with path parameters found"
    checked = []
    for route, params in routes:
        unknown = [p for p in params if p not in ids and p not in GLOBAL_PARAMS]
        assert not unknown, f"{route.path}: cannot fill path parameter(s) {unknown}: add them to tenant_a's ids"
        if set(params) <= GLOBAL_PARAMS:
            continue
        path = route.path
        for param in params:
            path = path.replace("{" + param + "}", ids[param])
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            response = client.request(method, path, json=_body_for(route.route), headers=caller.headers)
            assert response.status_code == 404, (method, route.path, response.status_code, response.text)
            assert response.json()["error"]["code"] == "not_found"
            missing = client.request(
                method, re.sub(r"{\w+}", "zz_missing", route.path), json=_body_for(route.route), headers=caller.headers
            )
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
            # Exactly the same answer for a foreign id as for a missing one.
            assert response.json() == missing.json()
            checked.append((method, route.path))

    assert len(checked) >= 10, checked
    assert snapshot(client, owner_a, ids) == before


def test_the_matrix_ids_are_real(client, app, tenant_a):
    """Control: A itself reaches every GET route of the matrix with the same ids (so 404s mean isolation)."""
    owner_a, ids = tenant_a
    for route, params in id_routes(app):
        if "GET" not in route.methods or set(params) <= GLOBAL_PARAMS:
            continue
        path = route.path
        for param in params:
            path = path.replace("{" + param + "}", ids[param])
        assert client.get(path, headers=owner_a.headers).status_code == 200, route.path


@pytest.mark.parametrize("caller_role", ["owner", "admin", "member"])
def test_operator_routes_refuse_every_tenant_member(client, app, tenant_a, caller_role):
    """Every operator route and method answers 403 to a tenant member, for its own tenant, another
    tenant and a missing one alike, and changes nothing."""
    owner_a, ids = tenant_a
    caller = owner_a if caller_role == "owner" else member_of(client, owner_a, caller_role)
    owner_b = register(client, prefix="tb")
    before = snapshot(client, owner_a, ids)
    routes = [r for r in all_routes(app) if r.path.startswith(OPERATOR_PREFIX)]
    assert len(routes) >= 5, [r.path for r in routes]
    checked = 0
    for route in routes:
        for tenant_id in (owner_a.tenant_id, owner_b.tenant_id, "ten_zz_missing"):
            path = route.path.replace("{tenant_id}", tenant_id)
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                response = client.request(method, path, json=_body_for(route.route), headers=caller.headers)
                assert response.status_code == 403, (method, route.path, response.text)
                assert response.json()["error"]["code"] == "forbidden"
                checked += 1
    assert checked >= 18
    assert snapshot(client, owner_a, ids) == before


def test_lists_never_show_other_tenants_rows(client, tenant_a):
    owner_b = register(client, prefix="tb")
    agents_b = client.get("/api/v1/agents", headers=owner_b.headers).json()["items"]
    assert agents_b == []
    stats_b = client.get("/api/v1/tenant/stats", headers=owner_b.headers).json()
    assert stats_b["agents"] == stats_b["api_keys"] == stats_b["messages"] == stats_b["memories"] == 0


PUBLIC_ROUTES = {
    "/health",
    "/api/v1/auth/register",
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
    "/api/v1/auth/logout",
}


def test_every_route_checks_the_membership(client, app, tenant_a):
    """A validly signed token whose membership row is gone is refused (401) by every API route."""
    from isolation import Scoped

    owner_a, ids = tenant_a
    admin = member_of(client, owner_a, "admin")
    Scoped(owner_a.ctx).memberships.delete(admin.account_id)
    before = snapshot(client, owner_a, ids)
    checked = 0
    for route in all_routes(app):
        if route.path in PUBLIC_ROUTES or not route.path.startswith("/api/"):
            continue
        path = route.path
        for param in re.findall(r"{(\w+)}", path):
            path = path.replace("{" + param + "}", ids.get(param, "friendly_assistant"))
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            response = client.request(method, path, json=_body_for(route.route), headers=admin.headers)
            assert response.status_code == 401, (method, route.path, response.text)
            checked += 1
    assert checked >= 20
    assert snapshot(client, owner_a, ids) == before
