"""Operator-only routes: the tenant list, a tenant's limits, suspension and usage counts.

Every route checks first that the caller is an operator (`Principal.operator`: a live session and
`accounts.is_operator`), and answers 403 to everyone else whatever the tenant id, so a non-operator
learns nothing about which tenants exist. Operators see no tenant content: the responses hold ids,
names, status, limits and counts, never messages, memories, agents or their settings. Changes take
effect on the next configurator request, and on live repliers at once with REDIS_URL (a "tenant"
change signal, isolation/signals.py: a suspended tenant's connections are closed on every instance)
or at their next limits refresh (`LIMITS_REFRESH_SECONDS`) without it or while Redis is down.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path

from configurator.api.deps import CurrentPrincipal, Principal, SettingsDep, SignalsDep, valid_id
from configurator.core.config import Settings
from configurator.core.errors import responses
from configurator.core.tenant_limits import limits_view, usage_today
from configurator.schemas import LimitOverrides, OperatorTenant, TenantLimitsOut, TenantUsage
from isolation import IsolationContext, NotFound, Scoped
from isolation.limits import ACTIVE, SUSPENDED, effective, overrides_of
from isolation.managers.tenancy import TenantManager
from isolation.operators import operator_tenants
from isolation.signals import Publisher, Signal

log = logging.getLogger("configurator")

router = APIRouter(prefix="/operator", tags=["operator"])

TenantIdPath = Annotated[str, Path(description="a tenant id")]


def _tenant(tenant_id: str) -> TenantManager:
    if not valid_id(tenant_id):
        raise NotFound("tenant")
    return Scoped(IsolationContext(tenant_id)).tenant


@router.get("/tenants", response_model=list[OperatorTenant], responses=responses(401, 403))
def list_tenants(principal: CurrentPrincipal, settings: SettingsDep) -> list[dict]:
    """Every tenant with its status and limits (no content)."""
    with principal.operator():
        rows = operator_tenants(principal.account_id)
    return [row | {"limits": effective(row["overrides"], settings).as_dict()} for row in rows]


@router.get("/tenants/{tenant_id}/limits", response_model=TenantLimitsOut, responses=responses(401, 403, 404))
def get_limits(principal: CurrentPrincipal, tenant_id: TenantIdPath, settings: SettingsDep) -> dict:
    with principal.operator():
        return limits_view(tenant_id, _tenant(tenant_id).limit_overrides(), settings)


@router.put("/tenants/{tenant_id}/limits", response_model=TenantLimitsOut, responses=responses(401, 403, 404))
def put_limits(
    principal: CurrentPrincipal,
    tenant_id: TenantIdPath,
    body: LimitOverrides,
    settings: SettingsDep,
    signals: SignalsDep,
) -> dict:
    """Replace the tenant's overrides: a field that is null or absent goes back to the default, 0 is unlimited."""
    with principal.operator():
        overrides = _tenant(tenant_id).set_limits(body.model_dump())
    signals.publish(Signal("tenant", tenant_id))
    log.info("operator %s set the limits of tenant %s: %s", principal.account_id, tenant_id, overrides)
    return limits_view(tenant_id, overrides, settings)


def _set_status(principal: Principal, tenant_id: str, status: str, settings: Settings, signals: Publisher) -> dict:
    """Set the status and tell the repliers; the answer is the tenant as the list shows it (no
    settings: tenant content)."""
    with principal.operator():
        row = _tenant(tenant_id).set_status(status)
    signals.publish(Signal("tenant", tenant_id))
    log.info("operator %s set tenant %s %s", principal.account_id, tenant_id, status)
    overrides = overrides_of(row)
    fields = ("id", "name", "type", "status", "created_at")
    return {f: row[f] for f in fields} | {"overrides": overrides, "limits": effective(overrides, settings).as_dict()}


@router.post("/tenants/{tenant_id}/suspend", response_model=OperatorTenant, responses=responses(401, 403, 404))
def suspend(principal: CurrentPrincipal, tenant_id: TenantIdPath, settings: SettingsDep, signals: SignalsDep) -> dict:
    """Suspend the tenant: its API calls answer 403 `tenant_suspended`, its replier connections are
    closed and refused."""
    return _set_status(principal, tenant_id, SUSPENDED, settings, signals)


@router.post("/tenants/{tenant_id}/resume", response_model=OperatorTenant, responses=responses(401, 403, 404))
def resume(principal: CurrentPrincipal, tenant_id: TenantIdPath, settings: SettingsDep, signals: SignalsDep) -> dict:
    return _set_status(principal, tenant_id, ACTIVE, settings, signals)


@router.get("/tenants/{tenant_id}/usage", response_model=TenantUsage, responses=responses(401, 403, 404))
def usage(principal: CurrentPrincipal, tenant_id: TenantIdPath, settings: SettingsDep) -> dict:
    """Today's tokens, LLM calls and messages (counts only), and the open replier connections."""
    with principal.operator():
        tenant = _tenant(tenant_id)
        tenant.get()  # NotFound for an unknown tenant
        return usage_today(tenant, settings)
