"""Cleanup: delete a tenant, an agent's history, or everything a test run created (by prefix).

Each function deletes table by table (children first) inside the tenant's own context, so on
PostgreSQL row-level security guards the deletes too, and returns rows deleted per table.
"""

from __future__ import annotations

from collections import Counter

from peewee import fn

from isolation import db as _db
from isolation.context import IsolationContext
from isolation.errors import Conflict, NotFound
from isolation.models import TENANT_MODELS, Account, RefreshToken, Tenant
from isolation.scoped import Scoped
from isolation.system import account_memberships

_HISTORY_MODELS = [
    m for m in TENANT_MODELS if m._meta.table_name in ("llm_usage", "memories", "messages", "chat_streams")
]


def _empty_counts() -> dict[str, int]:
    return {m._meta.table_name: 0 for m in TENANT_MODELS} | {"tenants": 0}


def delete_tenant(tenant_id: str) -> dict[str, int]:
    """Delete every row of `tenant_id` in every tenant table, then the tenant. Counts per table."""
    ctx = IsolationContext(tenant_id)
    counts = _empty_counts()
    with _db.write_transaction():
        _db.bind_tenant(ctx.tenant_id)
        for model in TENANT_MODELS:
            counts[model._meta.table_name] = model.delete().where(model.tenant_id == ctx.tenant_id).execute()
        counts["tenants"] = Tenant.delete().where(Tenant.id == ctx.tenant_id).execute()
    return counts


def delete_agent_history(ctx: IsolationContext, agent_id: str) -> dict[str, int]:
    """Delete one agent's chat streams, messages, memories and LLM usage (the agent and keys stay)."""
    agent_ctx = ctx.child(agent_id=agent_id)
    Scoped(agent_ctx).agents.get(agent_id)  # NotFound for foreign or missing agents
    counts: dict[str, int] = {}
    with _db.write_transaction():
        _db.bind_tenant(ctx.tenant_id)
        for model in _HISTORY_MODELS:
            counts[model._meta.table_name] = (
                model.delete().where((model.tenant_id == ctx.tenant_id) & (model.agent_id == agent_id)).execute()
            )
    return counts


def _starts(column, prefix: str):
    """Exact, case-sensitive prefix match (LIKE would treat `_` and `%` as wildcards)."""
    return fn.SUBSTR(column, 1, len(prefix)) == prefix


def _accounts_with_prefix(prefix: str) -> list[str]:
    return [a for (a,) in Account.select(Account.id).where(_starts(Account.username, prefix)).tuples()]


def tenants_with_prefix(prefix: str) -> list[str]:
    """Tenants named with `prefix`, or owned by an account whose username starts with it."""
    if not prefix or len(prefix) < 3:
        raise ValueError("a cleanup prefix needs at least 3 characters")
    found: set[str] = set()
    # tenants and accounts are global tables; the owner's memberships come through the narrow lookup.
    if _db.is_postgres():
        rows = _db.database.execute_sql("SELECT id FROM mt_tenants_with_prefix(%s)", (prefix,)).fetchall()
        found.update(r[0] for r in rows)
    else:
        found.update(t for (t,) in Tenant.select(Tenant.id).where(_starts(Tenant.name, prefix)).tuples())
    for account_id in _accounts_with_prefix(prefix):
        found.update(m["tenant_id"] for m in account_memberships(account_id) if m["role"] == "owner")
    return sorted(found)


def delete_by_prefix(prefix: str) -> dict[str, int]:
    """Delete the tenants of `tenants_with_prefix` and the accounts whose username starts with it."""
    totals: Counter[str] = Counter(_empty_counts())
    for tenant_id in tenants_with_prefix(prefix):
        totals.update(delete_tenant(tenant_id))
    for account_id in _accounts_with_prefix(prefix):
        # Memberships in tenants that survive (e.g. a bystander that invited this account) are
        # removed inside those tenants' own contexts, so the counts stay exact.
        for membership in account_memberships(account_id):
            _leave_tenant(account_id, membership["tenant_id"], totals)
        with _db.write_transaction():
            totals["accounts"] += Account.delete().where(Account.id == account_id).execute()
    return dict(totals)


def _leave_tenant(account_id: str, tenant_id: str, totals: Counter[str]) -> None:
    """Remove one membership and its refresh tokens inside that tenant's own context."""
    ctx = IsolationContext(tenant_id)
    with _db.write_transaction():
        _db.bind_tenant(ctx.tenant_id)
        totals["refresh_tokens"] += (
            RefreshToken.delete()
            .where((RefreshToken.tenant_id == ctx.tenant_id) & (RefreshToken.account_id == account_id))
            .execute()
        )
    Scoped(ctx).memberships.delete(account_id)
    totals["memberships"] += 1


def delete_account(account_id: str) -> dict[str, int]:
    """Delete an account. Tenants it alone belongs to go with it; its memberships elsewhere are removed.

    Raises `Conflict` (and deletes nothing) when the account is the only owner of a tenant that has
    other members: that tenant must be handed over or deleted first.
    """
    sole_tenants: list[str] = []
    shared_tenants: list[str] = []
    blocking: list[str] = []
    for membership in account_memberships(account_id):
        members = Scoped(IsolationContext(membership["tenant_id"])).memberships.list(limit=500)
        if len(members) == 1:
            sole_tenants.append(membership["tenant_id"])
            continue
        shared_tenants.append(membership["tenant_id"])
        other_owners = [m for m in members if m["role"] == "owner" and m["account_id"] != account_id]
        if membership["role"] == "owner" and not other_owners:
            blocking.append(membership["tenant_id"])
    if blocking:
        raise Conflict(
            "account",
            f"the account is the only owner of tenants with other members ({', '.join(blocking)}); "
            "hand them over or delete them first",
        )
    totals: Counter[str] = Counter(_empty_counts())
    totals["accounts"] = 0
    for tenant_id in sole_tenants:
        totals.update(delete_tenant(tenant_id))
    for tenant_id in shared_tenants:
        _leave_tenant(account_id, tenant_id, totals)
    with _db.write_transaction():
        totals["accounts"] += Account.delete().where(Account.id == account_id).execute()
    if totals["accounts"] == 0:
        raise NotFound("account")
    return dict(totals)
