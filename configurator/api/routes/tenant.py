"""The caller's tenant: read, rename/configure (owner/admin), stats, delete (owner).

`settings` is free-form JSON, held to `MAX_SETTINGS_BYTES` (configurator/core/sizes.py).
"""

from __future__ import annotations

from fastapi import APIRouter

from configurator.api.deps import ADMIN, OWNER, CurrentPrincipal, SettingsDep, SignalsDep
from configurator.core.errors import responses
from configurator.core.sizes import check_json_sizes
from configurator.core.tenant_limits import usage_today
from configurator.schemas import DeletedCounts, TenantOut, TenantStats, TenantUpdate
from isolation.cleanup import delete_tenant
from isolation.limits import effective
from isolation.signals import Signal

router = APIRouter(prefix="/tenant", tags=["tenant"])


@router.get("", response_model=TenantOut, responses=responses(401))
def get_tenant(principal: CurrentPrincipal) -> dict:
    with principal.session() as session:
        return session.scoped.tenant.get()


@router.patch("", response_model=TenantOut, responses=responses(401, 403, 413, 422))
def update_tenant(principal: CurrentPrincipal, body: TenantUpdate, settings: SettingsDep) -> dict:
    if body.settings is not None:
        check_json_sizes(settings.max_settings_bytes, settings=body.settings)
    with principal.session(ADMIN, write=True) as session:
        return session.scoped.tenant.update(name=body.name, settings=body.settings)


@router.get("/stats", response_model=TenantStats, responses=responses(401))
def tenant_stats(principal: CurrentPrincipal, settings: SettingsDep) -> dict:
    """Counts of everything the tenant owns, its effective limits and today's usage against them."""
    with principal.session() as session:
        tenant = session.scoped.tenant
        stats = tenant.stats()
        stats["limits"] = effective(tenant.limit_overrides(), settings).as_dict()
        stats["usage"] = usage_today(tenant, settings)
        return stats


@router.delete("", response_model=DeletedCounts, responses=responses(401, 403))
def remove_tenant(principal: CurrentPrincipal, signals: SignalsDep) -> DeletedCounts:
    """Delete the tenant and all of its data (agents, keys, history, memberships, sessions).
    Accounts stay; tokens for this tenant stop working at once, and so do its replier connections
    (on every replier at once with REDIS_URL, else at each one's next revocation check)."""
    with principal.session(OWNER, write=True) as session:
        counts = delete_tenant(session.tenant_id)
    signals.publish(Signal("tenant", principal.tenant_id))
    return DeletedCounts(deleted=counts)
