"""Who belongs to a tenant: the tenant row itself, its memberships and the members' refresh tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from peewee import Case, IntegrityError, fn

from isolation.context import IsolationContext
from isolation.db import unit_of_work
from isolation.errors import Conflict, NotFound
from isolation.ids import utcnow
from isolation.limits import TENANT_STATUSES, check_overrides, overrides_of
from isolation.managers import sql
from isolation.managers.agents import AgentManager, ApiKeyManager
from isolation.managers.base import TableManager, page_size, parent_must_exist
from isolation.managers.chat import ChatStreamManager, MemoryManager, MessageManager
from isolation.models import LlmUsage, Membership, Message, RefreshToken, ReplierPresence, Tenant

ROLES = ("owner", "admin", "member")


class TenantManager:
    """The context's own tenant row (the `tenants` table is keyed by the tenant id itself)."""

    entity = "tenant"

    def __init__(self, ctx: IsolationContext) -> None:
        self.ctx = ctx

    def _where(self):
        return Tenant.id == self.ctx.tenant_id

    def get(self) -> dict:
        with unit_of_work(self.ctx.tenant_id):
            row = Tenant.select().where(self._where()).dicts().first()
        if row is None:
            raise NotFound(self.entity)
        return row

    def update(self, *, name: str | None = None, settings: dict | None = None, type: str | None = None) -> dict:
        values: dict[Any, Any] = {Tenant.updated_at: utcnow()}
        if name is not None:
            values[Tenant.name] = name
        if settings is not None:
            values[Tenant.settings] = settings
        if type is not None:
            values[Tenant.type] = type
        with unit_of_work(self.ctx.tenant_id, write=True):
            if Tenant.update(values).where(self._where()).execute() == 0:
                raise NotFound(self.entity)
            return self.get()

    # -- limits and suspension (set by operators, read by enforcement) ------------------------
    def limit_overrides(self) -> dict[str, int | None]:
        """The operator's overrides of the tenant's limits (None: the default applies)."""
        return overrides_of(self.get())

    def set_limits(self, overrides: dict[str, int | None]) -> dict[str, int | None]:
        """Change the named overrides (None: back to the default); others stay. Returns all overrides."""
        check_overrides(overrides)
        now = utcnow()
        values: dict[Any, Any] = {getattr(Tenant, "limit_" + name): value for name, value in overrides.items()}
        values[Tenant.limits_updated_at] = now
        values[Tenant.updated_at] = now
        with unit_of_work(self.ctx.tenant_id, write=True):
            if Tenant.update(values).where(self._where()).execute() == 0:
                raise NotFound(self.entity)
            return self.limit_overrides()

    def set_status(self, status: str) -> dict:
        """Suspend ('suspended') or resume ('active') the tenant."""
        if status not in TENANT_STATUSES:
            raise ValueError(f"status must be one of {TENANT_STATUSES}")
        now = utcnow()
        with unit_of_work(self.ctx.tenant_id, write=True):
            changed = Tenant.update({Tenant.status: status, Tenant.updated_at: now}).where(self._where()).execute()
            if changed == 0:
                raise NotFound(self.entity)
            return self.get()

    def tokens_since(self, since: datetime) -> int:
        """LLM tokens (prompt + completion) the tenant used since `since` (index `llm_usage_tenant_time`)."""
        with unit_of_work(self.ctx.tenant_id):
            total = (
                LlmUsage.select(fn.COALESCE(fn.SUM(LlmUsage.prompt_tokens + LlmUsage.completion_tokens), 0))
                .where((LlmUsage.tenant_id == self.ctx.tenant_id) & (LlmUsage.created_at >= since))
                .scalar()
            )
        return int(total or 0)

    def usage_since(self, since: datetime, present_after: datetime) -> dict:
        """Counts only (no content): tokens and LLM calls since `since`, chat messages received and
        sent since `since`, and the open replier connections that processes reported after
        `present_after` (older reports are of processes that stopped)."""
        tenant_id = self.ctx.tenant_id
        with unit_of_work(tenant_id):
            calls = (
                LlmUsage.select(fn.COUNT(1))
                .where((LlmUsage.tenant_id == tenant_id) & (LlmUsage.created_at >= since))
                .scalar()
            )
            messages = dict(
                Message.select(Message.direction, fn.COUNT(1))
                .where((Message.tenant_id == tenant_id) & (Message.created_at >= since))
                .group_by(Message.direction)
                .tuples()
            )
            connections = (
                ReplierPresence.select(fn.COALESCE(fn.SUM(ReplierPresence.connections), 0))
                .where((ReplierPresence.tenant_id == tenant_id) & (ReplierPresence.updated_at > present_after))
                .scalar()
            )
            return {
                "since": since,
                "tokens": self.tokens_since(since),
                "llm_calls": int(calls or 0),
                "messages_in": int(messages.get("in", 0)),
                "messages_out": int(messages.get("out", 0)),
                "connections": int(connections or 0),
            }

    def report_connections(self, process_id: str, connections: int) -> None:
        """A replier process's count of the tenant's open connections (kept per process); `NotFound`
        when the tenant no longer exists."""
        now = utcnow()
        with parent_must_exist(self.entity), unit_of_work(self.ctx.tenant_id, write=True):
            ReplierPresence.insert(
                tenant_id=self.ctx.tenant_id, process_id=process_id, connections=connections, updated_at=now
            ).on_conflict(
                conflict_target=[ReplierPresence.tenant_id, ReplierPresence.process_id],
                update={ReplierPresence.connections: connections, ReplierPresence.updated_at: now},
            ).execute()

    def stats(self) -> dict:
        """Real counts of everything the tenant owns (read in one transaction on PostgreSQL)."""
        ctx = IsolationContext(self.ctx.tenant_id)
        with unit_of_work(ctx.tenant_id):
            usage = (
                LlmUsage.select(
                    fn.COUNT(1),
                    fn.COALESCE(fn.SUM(LlmUsage.prompt_tokens), 0),
                    fn.COALESCE(fn.SUM(LlmUsage.completion_tokens), 0),
                    fn.COALESCE(fn.SUM(Case(None, [(LlmUsage.outcome == "error", 1)], 0)), 0),
                )
                .where(LlmUsage.tenant_id == ctx.tenant_id)
                .tuples()
                .first()
            )
            api_keys = ApiKeyManager(ctx)
            return {
                "agents": AgentManager(ctx).count(),
                "api_keys": api_keys.count(),
                "active_api_keys": api_keys.count(status="active"),
                "members": MembershipManager(ctx).count(),
                "chat_streams": ChatStreamManager(ctx).count(),
                "messages": MessageManager(ctx).count(),
                "memories": MemoryManager(ctx).count(),
                "llm_calls": int(usage[0]),
                "llm_prompt_tokens": int(usage[1]),
                "llm_completion_tokens": int(usage[2]),
                "llm_errors": int(usage[3]),
            }


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")


class MembershipManager(TableManager):
    model = Membership
    entity = "membership"

    def _pk(self, row_id: str):
        return Membership.account_id == row_id

    def get(self, account_id: str) -> dict:
        """The account's membership in the context's tenant, or `NotFound`.

        Every authenticated configurator request checks its membership: one precompiled statement
        (`sql.membership`) with the tenant of the context and the account.
        """
        with self._reading():
            row = sql.membership(self.ctx.tenant_id, account_id)
        if row is None:
            raise NotFound(self.entity)
        return row

    def get_with_session(self, account_id: str, session_id: str) -> dict:
        """`get(account_id)` plus `session_active`: whether the sign-in session `session_id` of the
        account still has a refresh token that is neither revoked nor expired.

        One statement (`sql.membership_with_session`), so checking that an access token was not
        logged out costs no extra round trip on the hot path.
        """
        with self._reading():
            row = sql.membership_with_session(self.ctx.tenant_id, account_id, session_id)
        if row is None:
            raise NotFound(self.entity)
        return row

    def get_with_session_and_agent_page(
        self, account_id: str, session_id: str, limit: int = 50, offset: int = 0
    ) -> tuple[dict, str, bool]:
        """`get_with_session()` and the tenant's `agents.page_json(limit, offset)` in one statement
        (`sql.membership_with_agent_page`): the configurator's `GET /agents` in one round trip.
        `NotFound` when the account is not a member (then no page is read). The caller checks the
        returned membership (session, role, tenant status) before it uses the page."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        if self.ctx.agent_id is not None:
            raise ValueError("the agent page of a membership lists the whole tenant's agents")
        with self._reading():
            found = sql.membership_with_agent_page(self.ctx.tenant_id, account_id, session_id, page_size(limit), offset)
        if found is None:
            raise NotFound(self.entity)
        return found

    def add(self, account_id: str, role: str) -> dict:
        _check_role(role)
        try:
            with self._writing():
                self._insert(account_id=account_id, role=role, created_at=utcnow()).execute()
        except IntegrityError as exc:
            raise Conflict(self.entity, "account is already a member of this tenant") from exc
        return self.get(account_id)

    def list(self, limit: int = 100, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(Membership.created_at, Membership.account_id)
            return list(query.limit(page_size(limit)).offset(offset))

    def set_role(self, account_id: str, role: str) -> dict:
        _check_role(role)
        return self._update(account_id, {Membership.role: role})


class RefreshTokenManager(TableManager):
    model = RefreshToken
    entity = "refresh token"

    def _pk(self, row_id: str):
        return RefreshToken.jti == row_id

    def issue(self, jti: str, account_id: str, expires_at: datetime, *, session_id: str | None = None) -> dict:
        with parent_must_exist("membership"), self._writing():
            self._add(jti, account_id, expires_at, session_id, utcnow())
        return self.get(jti)

    def _add(self, jti: str, account_id: str, expires_at: datetime, session_id: str | None, now: datetime) -> None:
        self._insert(
            jti=jti, account_id=account_id, expires_at=expires_at, created_at=now, session_id=session_id
        ).execute()

    def rotate(
        self, jti: str, account_id: str, new_jti: str, expires_at: datetime, *, session_id: str | None = None
    ) -> dict:
        """Revoke `jti` and issue `new_jti` (of the same session) in one transaction.

        Raises `NotFound` when `jti` is unknown, expired, already used or (with `session_id`) of
        another session. Reuse of a rotated token revokes every token of the account (a stolen
        refresh token stops working for everyone).
        """
        now = utcnow()
        condition = self._usable(jti, account_id, now)
        if session_id is not None:
            condition &= RefreshToken.session_id == session_id
        with self._writing():
            used = RefreshToken.update(revoked_at=now, replaced_by=new_jti).where(condition).execute()
            if used:
                self._add(new_jti, account_id, expires_at, session_id, now)
        if used:
            return self.get(new_jti)
        try:
            reused = self._get(RefreshToken.jti == jti)["replaced_by"] is not None
        except NotFound:
            reused = False
        if reused:
            # Committed on its own: the NotFound below must not roll the revocation back.
            self.revoke_all(account_id)
        raise NotFound(self.entity)

    def _usable(self, jti: str, account_id: str, now: datetime):
        """The token `jti` of `account_id` in the context, neither revoked nor expired at `now`."""
        return (
            self._scope()
            & (RefreshToken.jti == jti)
            & (RefreshToken.account_id == account_id)
            & RefreshToken.revoked_at.is_null()
            & (RefreshToken.expires_at > now)
        )

    def is_active(self, jti: str, account_id: str) -> bool:
        with self._reading():
            return RefreshToken.select(RefreshToken.jti).where(self._usable(jti, account_id, utcnow())).exists()

    def revoke(self, jti: str) -> None:
        self._update(jti, {RefreshToken.revoked_at: utcnow()})

    def revoke_session(self, session_id: str) -> int:
        """Revoke every refresh token of one sign-in session (its access tokens stop working too)."""
        return self._revoke_where(RefreshToken.session_id == session_id)

    def revoke_all(self, account_id: str) -> int:
        return self._revoke_where(RefreshToken.account_id == account_id)

    def _revoke_where(self, condition) -> int:
        with self._writing():
            return (
                RefreshToken.update(revoked_at=utcnow())
                .where(self._scope() & condition & RefreshToken.revoked_at.is_null())
                .execute()
            )
