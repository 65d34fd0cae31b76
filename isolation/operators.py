"""Reads and writes across tenants, for operators and for limit enforcement. No tenant content.

Operators are accounts with `accounts.is_operator` set (`invoke create-operator`, which runs as the
schema owner: on PostgreSQL the application role may not write that column). Being an operator
makes nobody a member of a tenant: what operators reach is the tenant list (id, name, type, status,
limits) here, and each tenant's limits, status and usage counts through `Scoped(ctx).tenant`, never
messages, memories or agents.

On PostgreSQL row-level security hides other tenants' rows from the application role, so the two
reads across tenants go through `SECURITY DEFINER` functions of migration 6: `mt_tenant_controls`
(status and overrides of given tenants, for the replier) and `mt_operator_tenants` (the list, which
returns nothing unless the given account is an operator).
"""

from __future__ import annotations

from collections.abc import Iterable

from isolation import db as _db
from isolation.db import make_database, unit_of_work
from isolation.errors import NotFound
from isolation.limits import LIMIT_NAMES, TenantControl
from isolation.models import Account, Tenant

_LIMIT_COLUMNS = ", ".join("limit_" + name for name in LIMIT_NAMES)
_LIMIT_FIELDS = tuple(getattr(Tenant, "limit_" + name) for name in LIMIT_NAMES)
_SQLITE_CHUNK = 500  # below SQLite's bound-parameter limit


def _overrides(values: Iterable) -> dict[str, int | None]:
    return {name: None if value is None else int(value) for name, value in zip(LIMIT_NAMES, values, strict=True)}


def tenant_controls(tenant_ids: Iterable[str]) -> dict[str, TenantControl]:
    """Status and overrides of several tenants in one round trip (unknown ids are left out)."""
    ids = sorted(set(tenant_ids))
    if not ids:
        return {}
    if _db.is_postgres():
        rows = _db.database.execute_sql(
            f"SELECT id, status, {_LIMIT_COLUMNS} FROM mt_tenant_controls(%s)", (ids,)
        ).fetchall()
    else:
        rows = []
        for start in range(0, len(ids), _SQLITE_CHUNK):
            chunk = ids[start : start + _SQLITE_CHUNK]
            rows.extend(Tenant.select(Tenant.id, Tenant.status, *_LIMIT_FIELDS).where(Tenant.id.in_(chunk)).tuples())
    return {row[0]: TenantControl(row[0], row[1], _overrides(row[2:])) for row in rows}


def is_operator(account_id: str) -> bool:
    """Whether the account is an operator (accounts are not tenant data: no binding needed)."""
    with unit_of_work():
        flag = Account.select(Account.is_operator).where(Account.id == account_id).scalar()
    return bool(flag)


_TENANT_FIELDS = ("id", "name", "type", "status", "created_at")


def operator_tenants(operator_account_id: str) -> list[dict]:
    """Every tenant (oldest first) with its overrides, for an operator; [] for anyone else."""
    if _db.is_postgres():
        rows = _db.database.execute_sql(
            f"SELECT id, name, type, status, created_at, {_LIMIT_COLUMNS} FROM mt_operator_tenants(%s)",
            (operator_account_id,),
        ).fetchall()
    else:
        if not is_operator(operator_account_id):
            return []
        rows = list(
            Tenant.select(Tenant.id, Tenant.name, Tenant.type, Tenant.status, Tenant.created_at, *_LIMIT_FIELDS)
            .order_by(Tenant.created_at, Tenant.id)
            .tuples()
        )
    return [dict(zip(_TENANT_FIELDS, row[:5], strict=True)) | {"overrides": _overrides(row[5:])} for row in rows]


def set_operator(url: str, username: str, operator: bool = True) -> dict:
    """Mark (or unmark) the account `username` as an operator, as the database URL's own role (the
    schema owner on PostgreSQL). Returns {id, username, is_operator}; `NotFound` for an unknown name."""
    db = make_database(url, admin=True)
    try:
        with db.atomic():
            changed = db.execute_sql(
                f"UPDATE accounts SET is_operator = {db.param} WHERE username = {db.param}", (operator, username)
            ).rowcount
            if not changed:
                raise NotFound("account")
            row = db.execute_sql(
                f"SELECT id, username, is_operator FROM accounts WHERE username = {db.param}", (username,)
            ).fetchone()
    finally:
        db.close()
    return {"id": row[0], "username": row[1], "is_operator": bool(row[2])}
