"""Dependencies: the caller's access token, its tenant session, settings, pagination, path ids.

The tenant of every request comes from the access token's `tid` *and* a membership row for
(`tid`, `sub`) that still exists; nothing the client sends in a header, query or body chooses it.
The same statement checks that the token's sign-in session (`sid`) was not logged out.

`CurrentPrincipal` checks the token itself (signature, expiry, issuer, audience, type) without I/O, so
it is an ``async def`` dependency. The membership row is read by `principal.session(...)`, which a
route opens in its own (sync, thread-pool) body: one thread hop and one connection per request, and
the only way to get an `IsolationContext` or a `Scoped` for the tenant is through that check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from configurator.core.config import Settings
from configurator.core.db import connection
from configurator.core.errors import forbidden, unauthorized
from configurator.core.security import ACCESS, TokenError, TokenService
from configurator.core.tenant_limits import RestLimits
from isolation import IsolationContext, NotFound, Scoped
from isolation.context import is_id
from isolation.db import unit_of_work
from isolation.operators import is_operator
from isolation.signals import Publisher

ANY_ROLE: tuple[str, ...] = ("owner", "admin", "member")
ADMIN: tuple[str, ...] = ("owner", "admin")
OWNER: tuple[str, ...] = ("owner",)

bearer = HTTPBearer(auto_error=False, description="access token from /api/v1/auth/login or /register")


def valid_id(value: str) -> bool:
    return is_id(value)  # isolation's id alphabet: anything else cannot be one of our ids


def membership_role(account_id: str, tenant_id: str) -> str | None:
    """The account's role in the tenant, or None when it is not (or no longer) a member."""
    if not (valid_id(account_id) and valid_id(tenant_id)):
        return None
    try:
        with connection():
            return Scoped(IsolationContext(tenant_id)).memberships.get(account_id)["role"]
    except NotFound:
        return None


@dataclass(frozen=True, slots=True)
class TenantSession:
    """A verified member of a tenant, inside an open database connection."""

    account_id: str
    role: str
    ctx: IsolationContext

    @property
    def tenant_id(self) -> str:
        return self.ctx.tenant_id

    @property
    def scoped(self) -> Scoped:
        return Scoped(self.ctx)


@dataclass(frozen=True, slots=True)
class Principal:
    """What a valid access token claims: an account in a tenant, signed in as session `session_id`
    (membership and session not yet checked)."""

    account_id: str
    tenant_id: str
    session_id: str
    limits: RestLimits | None = None  # suspension and the tenant's request limit (app.state.rest_limits)

    @contextmanager
    def session(self, roles: tuple[str, ...] = ANY_ROLE, *, write: bool = False) -> Iterator[TenantSession]:
        """Open the connection, check the membership and the session (401 when gone or logged out),
        the tenant (403 `tenant_suspended`, 429 over its request limit, configurator/core/tenant_limits.py)
        and the role (403), and yield.

        The body is one `unit_of_work` of the tenant: reads run without a transaction (on PostgreSQL
        each statement carries the tenant binding in its own round trip, isolation/db.py);
        `write=True` makes the whole body one write transaction (`BEGIN` sent with the binding on
        PostgreSQL, `BEGIN IMMEDIATE` on SQLite, so writers queue instead of failing).
        """
        self._check_ids()
        ctx = IsolationContext(self.tenant_id)
        with connection(), unit_of_work(ctx.tenant_id, write=write):
            try:
                membership = Scoped(ctx).memberships.get_with_session(self.account_id, self.session_id)
            except NotFound:
                raise unauthorized("token no longer valid for this tenant") from None
            role = self._admit(membership, roles)
            yield TenantSession(self.account_id, role, ctx)

    def agents_page(self, limit: int, offset: int) -> tuple[str, bool]:
        """`session()` and `agents.page_json(limit, offset)` in one statement (`GET /agents`, a hot
        route): the same checks, answered before the page is used; (JSON array, more follow)."""
        self._check_ids()
        ctx = IsolationContext(self.tenant_id)
        with connection(), unit_of_work(ctx.tenant_id):
            try:
                membership, items, more = Scoped(ctx).memberships.get_with_session_and_agent_page(
                    self.account_id, self.session_id, limit, offset
                )
            except NotFound:
                raise unauthorized("token no longer valid for this tenant") from None
            self._admit(membership, ANY_ROLE)
        return items, more

    def _check_ids(self) -> None:
        if not (valid_id(self.account_id) and valid_id(self.tenant_id) and valid_id(self.session_id)):
            raise unauthorized("invalid token")

    def _admit(self, membership: dict, roles: tuple[str, ...]) -> str:
        """The session (401), the tenant's status and request limit (403/429) and the role (403) of a
        membership row from `get_with_session`; the role."""
        if not membership["session_active"]:
            raise unauthorized("session ended (signed out or revoked): sign in again")
        if self.limits is not None:
            self.limits.admit(self.tenant_id, membership["tenant_status"], membership["limit_requests_per_minute"])
        role = membership["role"]
        if role not in roles:
            raise forbidden(f"this needs the role {' or '.join(roles)} (you are {role})")
        return role

    @contextmanager
    def operator(self) -> Iterator[None]:
        """Open the connection and check that the token's session is live (401) and that the account
        is an operator (403 for everyone else, before anything about a tenant is read).

        The operator's own tenant is only where its session lives: it is neither rate-limited nor
        checked for suspension here, and being an operator makes nobody a member of other tenants.
        """
        self._check_ids()
        with connection():
            try:
                membership = Scoped(IsolationContext(self.tenant_id)).memberships.get_with_session(
                    self.account_id, self.session_id
                )
            except NotFound:
                raise unauthorized("token no longer valid") from None
            if not membership["session_active"]:
                raise unauthorized("session ended (signed out or revoked): sign in again")
            if not is_operator(self.account_id):
                raise forbidden("operators only")
            yield


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_tokens(request: Request) -> TokenService:
    return request.app.state.tokens


async def get_signals(request: Request) -> Publisher:
    return request.app.state.signals


SettingsDep = Annotated[Settings, Depends(get_settings)]
TokensDep = Annotated[TokenService, Depends(get_tokens)]
# Change signals to the repliers (isolation/signals.py): published after the change is committed.
SignalsDep = Annotated[Publisher, Depends(get_signals)]


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    # The token service is read from the app directly, not through `TokensDep`: one dependency
    # fewer to solve on every authenticated request.
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorized("missing bearer token", invalid=False)
    try:
        claims = request.app.state.tokens.decode(credentials.credentials, ACCESS)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    return Principal(claims.account_id, claims.tenant_id, claims.session_id, request.app.state.rest_limits)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


# ---- pagination -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pagination:
    """`?limit=&offset=` of a list route, and the one place that builds its page body (`schemas.Page`)."""

    limit: int
    offset: int

    def body(self, items: object, *, more: bool) -> dict:
        """The page as the API returns it: `items`, the window, and where the next page starts (null on the last)."""
        next_offset = self.offset + self.limit if more else None
        return {"items": items, "limit": self.limit, "offset": self.offset, "next_offset": next_offset}

    def of(self, rows: list) -> dict:
        """The page body of rows fetched with `limit + 1`: the extra row only says that another page exists."""
        return self.body(rows[: self.limit], more=len(rows) > self.limit)


async def pagination(
    limit: Annotated[int, Query(ge=1, le=200, description="page size")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="rows to skip")] = 0,
) -> Pagination:
    return Pagination(limit, offset)


PageDep = Annotated[Pagination, Depends(pagination)]


# ---- path ids: malformed ids are simply not found (never a database error) ---------------------
def _checked(value: str, entity: str) -> str:
    if not valid_id(value):
        raise NotFound(entity)
    return value


async def _agent_id(agent_id: Annotated[str, Path()]) -> str:
    return _checked(agent_id, "agent")


async def _key_id(key_id: Annotated[str, Path()]) -> str:
    return _checked(key_id, "api key")


async def _stream_id(stream_id: Annotated[str, Path()]) -> str:
    return _checked(stream_id, "chat stream")


async def _memory_id(memory_id: Annotated[str, Path()]) -> str:
    return _checked(memory_id, "memory")


async def _template_id(template_id: Annotated[str, Path()]) -> str:
    return _checked(template_id, "agent template")


AgentId = Annotated[str, Depends(_agent_id)]
KeyId = Annotated[str, Depends(_key_id)]
StreamId = Annotated[str, Depends(_stream_id)]
MemoryId = Annotated[str, Depends(_memory_id)]
TemplateId = Annotated[str, Depends(_template_id)]
