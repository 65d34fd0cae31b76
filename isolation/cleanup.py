"""Cleanup: delete a tenant, an agent's history, an account, or what a test run created (by prefix).

A prefix cleanup matches account usernames only (test runs name their accounts with the run id) and
takes the tenants those accounts alone belong to; it never matches tenant names, which customers choose.

Each function deletes table by table (children first) inside the tenant's own context, so on
PostgreSQL row-level security guards the deletes too, and returns rows deleted per table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from peewee import fn

from isolation.context import IsolationContext
from isolation.db import unit_of_work
from isolation.errors import Conflict, NotFound
from isolation.models import TENANT_MODELS, Account, Membership, RefreshToken, Tenant
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
    with unit_of_work(ctx.tenant_id, write=True):
        for model in TENANT_MODELS:
            counts[model._meta.table_name] = model.delete().where(model.tenant_id == ctx.tenant_id).execute()
        counts["tenants"] = Tenant.delete().where(Tenant.id == ctx.tenant_id).execute()
    return counts


def delete_agent_history(ctx: IsolationContext, agent_id: str) -> dict[str, int]:
    """Delete one agent's chat streams, messages, memories and LLM usage (the agent and keys stay)."""
    agent_ctx = ctx.child(agent_id=agent_id)
    Scoped(agent_ctx).agents.get(agent_id)  # NotFound for foreign or missing agents
    counts: dict[str, int] = {}
    with unit_of_work(ctx.tenant_id, write=True):
        for model in _HISTORY_MODELS:
            counts[model._meta.table_name] = (
                model.delete().where((model.tenant_id == ctx.tenant_id) & (model.agent_id == agent_id)).execute()
            )
    return counts


# A run id of `integration_tests` (`it_<yyyymmddhhmmss>_<6 hex>`, see `runner.new_run_prefix`): prefixes
# shorter than this could match more than one run, or people, and need `force`.
RUN_ID_LENGTH = len("it_20261122031425_532a26")
MIN_FORCED_PREFIX_LENGTH = 3


def check_prefix(prefix: str, *, force: bool = False) -> str:
    """`prefix` if a prefix cleanup may use it, else `ValueError` saying why (the CLIs exit 2 with it)."""
    if not prefix:
        raise ValueError("an empty cleanup prefix would match every account: refused")
    if len(prefix) < MIN_FORCED_PREFIX_LENGTH:
        raise ValueError(f"a cleanup prefix needs at least {MIN_FORCED_PREFIX_LENGTH} characters")
    if len(prefix) < RUN_ID_LENGTH and not force:
        raise ValueError(
            f"prefix {prefix!r} is shorter than a run id ({RUN_ID_LENGTH} characters, e.g. it_20261122031425_532a26) "
            "and may match accounts of other runs or of real users; pass --force if you mean it"
        )
    return prefix


def _starts(column, prefix: str):
    """Exact, case-sensitive prefix match (LIKE would treat `_` and `%` as wildcards)."""
    return fn.SUBSTR(column, 1, len(prefix)) == prefix


def accounts_with_prefix(prefix: str) -> list[dict]:
    """Accounts whose username starts with `prefix`: [{id, username}], by username.

    Usernames are what test runs choose (the run id first); tenant names are chosen by customers and
    are never matched, so a customer's tenant called `it_<run>_…` is not touched.
    """
    if not prefix:
        raise ValueError("an empty cleanup prefix would match every account: refused")
    query = (
        Account.select(Account.id, Account.username)
        .where(_starts(Account.username, prefix))
        .order_by(Account.username)
        .dicts()
    )
    return list(query)


@dataclass(frozen=True)
class PrefixPlan:
    """What a prefix cleanup deletes, worked out before anything is deleted.

    `accounts`: the matched accounts that go. `tenants`: tenants whose every member is a matched
    account (deleted with all their data). `memberships`: (account, tenant) memberships of matched
    accounts in tenants that have other members (only the membership goes). `kept`: matched accounts
    that are the only owners of a tenant with other members, with those tenants; such an account, its
    memberships and its tenants are left alone, since deleting it would leave someone else's tenant
    without an owner.
    """

    accounts: list[str]
    tenants: list[str]
    memberships: list[tuple[str, str]]
    kept: dict[str, list[str]]


def plan_prefix_cleanup(prefix: str) -> PrefixPlan:
    """The `PrefixPlan` of the accounts whose username starts with `prefix`."""
    matched = {a["id"] for a in accounts_with_prefix(prefix)}
    ours: dict[str, dict[str, str]] = {}  # tenant -> {matched account: role}
    for account_id in sorted(matched):
        for membership in account_memberships(account_id):
            ours.setdefault(membership["tenant_id"], {})[account_id] = membership["role"]
    outsiders: dict[str, set[str]] = {}  # tenant -> roles of its members that were not matched
    kept: dict[str, list[str]] = {}
    for tenant_id, roles in sorted(ours.items()):
        with unit_of_work(tenant_id):
            members = (
                Membership.select(Membership.account_id, Membership.role)
                .where(Membership.tenant_id == tenant_id)
                .tuples()
            )
            outsiders[tenant_id] = {role for account_id, role in members if account_id not in matched}
        if outsiders[tenant_id] and "owner" not in outsiders[tenant_id]:
            for account_id in (a for a, role in roles.items() if role == "owner"):
                kept.setdefault(account_id, []).append(tenant_id)
    tenants: list[str] = []
    memberships: list[tuple[str, str]] = []
    for tenant_id, roles in sorted(ours.items()):
        if not outsiders[tenant_id] and not roles.keys() & kept.keys():
            tenants.append(tenant_id)
        else:
            memberships.extend((account_id, tenant_id) for account_id in sorted(roles) if account_id not in kept)
    return PrefixPlan(sorted(matched - kept.keys()), tenants, memberships, kept)


def delete_by_prefix(prefix: str, *, force: bool = False) -> dict[str, int]:
    """Delete the accounts whose username starts with `prefix`, and the tenants only they belong to.

    A tenant with any other member is never deleted: the matched accounts' memberships in it are
    removed, except where a matched account is its only owner (that account is kept; see
    `PrefixPlan`). `check_prefix` applies (`force` for prefixes shorter than a run id). Rows deleted
    per table.
    """
    check_prefix(prefix, force=force)
    plan = plan_prefix_cleanup(prefix)
    totals: Counter[str] = Counter(_empty_counts())
    totals["accounts"] = 0
    for tenant_id in plan.tenants:
        totals.update(delete_tenant(tenant_id))
    for account_id, tenant_id in plan.memberships:
        # Inside that tenant's own context, so the counts stay exact and RLS guards the delete.
        _leave_tenant(account_id, tenant_id, totals)
    for account_id in plan.accounts:
        with unit_of_work(write=True):
            totals["accounts"] += Account.delete().where(Account.id == account_id).execute()
    return dict(totals)


def _leave_tenant(account_id: str, tenant_id: str, totals: Counter[str]) -> None:
    """Remove one membership and its refresh tokens inside that tenant's own context."""
    ctx = IsolationContext(tenant_id)
    with unit_of_work(ctx.tenant_id, write=True):
        totals["refresh_tokens"] += (
            RefreshToken.delete()
            .where((RefreshToken.tenant_id == ctx.tenant_id) & (RefreshToken.account_id == account_id))
            .execute()
        )
    Scoped(ctx).memberships.delete(account_id)
    totals["memberships"] += 1


def delete_account(account_id: str, deleted_tenants: list[str] | None = None) -> dict[str, int]:
    """Delete an account. Tenants it alone belongs to go with it; its memberships elsewhere are removed.

    Raises `Conflict` (and deletes nothing) when the account is the only owner of a tenant that has
    other members: that tenant must be handed over or deleted first. The ids of the tenants deleted
    (each committed) are appended to `deleted_tenants`, so the caller can tell the repliers to close
    their connections.
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
        if deleted_tenants is not None:
            deleted_tenants.append(tenant_id)
    for tenant_id in shared_tenants:
        _leave_tenant(account_id, tenant_id, totals)
    with unit_of_work(write=True):
        totals["accounts"] += Account.delete().where(Account.id == account_id).execute()
    if totals["accounts"] == 0:
        raise NotFound("account")
    return dict(totals)
