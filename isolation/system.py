"""Operations that must run before a tenant is known, kept narrow and explicit.

Login needs an account's memberships and password hash, the replier needs the tenant of an API key
(and, for recovery, the keys of unanswered messages of every tenant), registration creates a tenant.
On PostgreSQL these lookups go through `SECURITY DEFINER` functions (`mt_lookup_api_key`,
`mt_account_memberships`, `mt_login_secret`, `mt_unanswered_messages`) that return only the columns
needed, and the application role may read every column of `accounts` except `password_hash`; nothing
here returns another tenant's data to a caller that does not already hold the credential (the
recovery scan returns message keys only, never content, to the replier's own process).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from peewee import JOIN, IntegrityError, Value, fn

from isolation import db as _db
from isolation.context import IsolationContext
from isolation.errors import Conflict, NotFound
from isolation.ids import hash_api_key, new_id, utcnow
from isolation.models import Account, Agent, AgentTemplate, ApiKey, Membership, Message, Tenant

TENANT_TYPES = ("personal", "enterprise")


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal:
    """Who an API key speaks for. `context` is the T+A isolation context it grants."""

    key_id: str
    tenant_id: str
    agent_id: str
    status: str
    expires_at: datetime | None

    @property
    def context(self) -> IsolationContext:
        return IsolationContext(self.tenant_id, self.agent_id)

    def refusal(self, now: datetime | None = None) -> str | None:
        """Why this key may not be used now, or None when it may."""
        if self.status != "active":
            return "api key revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "api key expired"
        return None


def lookup_api_key(secret: str) -> ApiKeyPrincipal | None:
    """The principal of an API key secret (by its SHA-256), or None for an unknown key."""
    if not secret or len(secret) > 512:
        return None
    key_hash = hash_api_key(secret)
    if _db.is_postgres():
        row = _db.database.execute_sql(
            "SELECT tenant_id, id, agent_id, status, expires_at FROM mt_lookup_api_key(%s)", (key_hash,)
        ).fetchone()
    else:
        row = (
            ApiKey.select(ApiKey.tenant_id, ApiKey.id, ApiKey.agent_id, ApiKey.status, ApiKey.expires_at)
            .where(ApiKey.key_hash == key_hash)
            .tuples()
            .first()
        )
    if row is None:
        return None
    tenant_id, key_id, agent_id, status, expires_at = row
    return ApiKeyPrincipal(key_id, tenant_id, agent_id, status, expires_at)


def account_memberships(account_id: str) -> list[dict]:
    """The tenants an account belongs to, oldest first: [{tenant_id, role}]."""
    if _db.is_postgres():
        cursor = _db.database.execute_sql(
            "SELECT tenant_id, role FROM mt_account_memberships(%s) ORDER BY created_at, tenant_id", (account_id,)
        )
        return [{"tenant_id": t, "role": r} for t, r in cursor.fetchall()]
    query = (
        Membership.select(Membership.tenant_id, Membership.role)
        .where(Membership.account_id == account_id)
        .order_by(Membership.created_at, Membership.tenant_id)
        .dicts()
    )
    return list(query)


# What `mt_login_secret` returns besides the hash: the same fields as `_account_columns()`.
_LOGIN_FIELDS = ("id", "username", "email", "status", "created_at")


def _account_columns():
    """The account fields callers get: not the hash, nor the operator mark (`isolation.operators`)."""
    return [f for name, f in Account._meta.fields.items() if name not in ("password_hash", "is_operator")]


def create_account(username: str, email: str, password_hash: str) -> dict:
    """A new account; `Conflict` when the username or email is taken."""
    account_id = new_id("acc")
    try:
        with _db.unit_of_work(write=True):
            Account.insert(
                id=account_id, username=username, email=email, password_hash=password_hash, created_at=utcnow()
            ).execute()
    except IntegrityError as exc:
        raise Conflict("account", "username or email already registered") from exc
    return get_account(account_id)


def get_account(account_id: str) -> dict:
    row = Account.select(*_account_columns()).where(Account.id == account_id).dicts().first()
    if row is None:
        raise NotFound("account")
    return row


def find_account_for_login(login: str) -> tuple[dict, str] | None:
    """(account, password hash) of the account whose username (first) or email is exactly `login`, or None.

    On PostgreSQL the application role may not read `password_hash` (column privileges): the one hash
    login needs comes from the `SECURITY DEFINER` function `mt_login_secret`.
    """
    if _db.is_postgres():
        row = _db.database.execute_sql(
            "SELECT id, username, email, status, created_at, password_hash FROM mt_login_secret(%s)", (login,)
        ).fetchone()
        if row is None:
            return None
        *values, password_hash = row
        return dict(zip(_LOGIN_FIELDS, values, strict=True)), password_hash
    row = (
        Account.select(*_account_columns(), Account.password_hash)
        .where((Account.username == login) | (Account.email == login))
        .order_by((Account.username == login).desc(), Account.id)
        .dicts()
        .first()
    )
    if row is None:
        return None
    password_hash = row.pop("password_hash")
    return row, password_hash


def set_password_hash(account_id: str, password_hash: str) -> None:
    """Store a re-hashed password (pwdlib asks for it when parameters change)."""
    with _db.unit_of_work(write=True):
        Account.update(password_hash=password_hash).where(Account.id == account_id).execute()


def create_tenant(
    name: str, owner_account_id: str, tenant_type: str = "personal", settings: dict | None = None
) -> dict:
    """A new tenant with `owner_account_id` as owner, in one transaction."""
    if tenant_type not in TENANT_TYPES:
        raise ValueError(f"tenant type must be one of {TENANT_TYPES}")
    tenant_id = new_id("ten")
    now = utcnow()
    with _db.unit_of_work(tenant_id, write=True):
        Tenant.insert(
            id=tenant_id, name=name, type=tenant_type, settings=settings or {}, created_at=now, updated_at=now
        ).execute()
        Membership.insert(tenant_id=tenant_id, account_id=owner_account_id, role="owner", created_at=now).execute()
        row = Tenant.select().where(Tenant.id == tenant_id).dicts().first()
    return row


def list_templates() -> list[dict]:
    return list(AgentTemplate.select().order_by(AgentTemplate.id).dicts())


def get_template(template_id: str) -> dict:
    row = AgentTemplate.select().where(AgentTemplate.id == template_id).dicts().first()
    if row is None:
        raise NotFound("agent template")
    return row


@dataclass(frozen=True, slots=True)
class UnansweredMessage:
    """The keys of a stored inbound message with no reply (no text: it is read in its tenant's context)."""

    tenant_id: str
    agent_id: str
    platform: str
    chat_stream_id: str
    message_id: str
    created_at: datetime


REPLY_PREFIX = "mt-reply:"  # the replier's reply ids: `mt-reply:<stored inbound message id>`
MAX_UNANSWERED = 1000


def unanswered_messages(max_age_seconds: float, min_age_seconds: float, limit: int) -> list[UnansweredMessage]:
    """Inbound messages of every tenant, created between `max_age_seconds` and `min_age_seconds` ago,
    whose agent is active and that have no reply `mt-reply:<message id>` in their stream; oldest
    first, at most `limit` (capped at 1000). The replier's recovery pass answers them.

    On PostgreSQL through `mt_unanswered_messages` (SECURITY DEFINER, m0005): the application role
    sees one tenant's rows only, and this returns keys, never content.
    """
    now = utcnow()
    oldest, newest = now - timedelta(seconds=max_age_seconds), now - timedelta(seconds=min_age_seconds)
    limit = max(0, min(int(limit), MAX_UNANSWERED))
    if _db.is_postgres():
        rows = _db.database.execute_sql(
            "SELECT tenant_id, agent_id, platform, chat_stream_id, message_id, created_at "
            "FROM mt_unanswered_messages(%s, %s, %s)",
            (oldest, newest, limit),
        ).fetchall()
    else:
        reply = Message.alias("reply")
        answered = reply.select(reply.id).where(
            (reply.tenant_id == Message.tenant_id)
            & (reply.chat_stream_id == Message.chat_stream_id)
            & (reply.message_id == Value(REPLY_PREFIX).concat(Message.message_id))
        )
        rows = (
            Message.select(
                Message.tenant_id,
                Message.agent_id,
                Message.platform,
                Message.chat_stream_id,
                Message.message_id,
                Message.created_at,
            )
            .join(Agent, JOIN.INNER, on=(Agent.tenant_id == Message.tenant_id) & (Agent.id == Message.agent_id))
            .where(
                (Message.direction == "in")
                & (Message.created_at > oldest)
                & (Message.created_at <= newest)
                & (Agent.status == "active")
                & ~fn.EXISTS(answered)
            )
            .order_by(Message.created_at, Message.tenant_id, Message.id)
            .limit(limit)
            .tuples()
        )
    return [UnansweredMessage(*row) for row in rows]
