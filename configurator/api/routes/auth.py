"""Registration, login, token refresh (rotating), logout and the current account.

Limits (in-process, see configurator/core/ratelimit.py): failed logins per account, the username and
the email of one account being the same bucket (a name that matches no account is a bucket of its
own), and failed logins per client address; registrations per client address. Each answers 429 with
Retry-After. The client address is the TCP peer unless FORWARDED_ALLOW_IPS names trusted proxies.

Every login or registration starts a session (the tokens' `sid`); refresh keeps it, logout ends it,
and an access token works only while its session does (configurator/api/deps.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from configurator.api.deps import (
    CurrentPrincipal,
    Principal,
    SettingsDep,
    SignalsDep,
    TokensDep,
    membership_role,
    valid_id,
)
from configurator.core.config import Settings
from configurator.core.db import connection
from configurator.core.errors import ApiError, forbidden, responses, unauthorized
from configurator.core.passwords import password_problem
from configurator.core.ratelimit import Limiter
from configurator.core.security import ACCESS, REFRESH, PasswordHasher, TokenError, TokenService, new_session_id
from configurator.schemas import (
    AuthResponse,
    DeleteAccountRequest,
    DeletedCounts,
    LoginRequest,
    LogoutRequest,
    MeResponse,
    RefreshRequest,
    RegisterRequest,
    TokenPair,
)
from isolation import IsolationContext, NotFound, Scoped, system
from isolation.cleanup import delete_account
from isolation.db import unit_of_work
from isolation.signals import Publisher, Signal

router = APIRouter(prefix="/auth", tags=["auth"])


async def _hasher(request: Request) -> PasswordHasher:
    return request.app.state.hasher


HasherDep = Annotated[PasswordHasher, Depends(_hasher)]


def client_address(request: Request) -> str:
    """The address the limits count: the TCP peer (uvicorn puts a trusted proxy's X-Forwarded-For here)."""
    return request.client.host if request.client else "unknown"


def _rate_limited(wait: int, message: str) -> ApiError:
    return ApiError(429, "rate_limited", message, {"retry_after": wait}, headers={"Retry-After": str(wait)})


def _issue_pair(tokens, account_id: str, tenant_id: str) -> TokenPair:
    """A new session: an access token and a stored refresh token (call inside an open connection)."""
    session_id = new_session_id()
    access = tokens.issue(ACCESS, account_id, tenant_id, session_id=session_id)
    refresh = tokens.issue(REFRESH, account_id, tenant_id, session_id=session_id)
    Scoped(IsolationContext(tenant_id)).refresh_tokens.issue(
        refresh.jti, account_id, refresh.expires_at, session_id=session_id
    )
    return TokenPair(
        access_token=access.token,
        refresh_token=refresh.token,
        expires_in=access.expires_in,
        refresh_expires_in=refresh.expires_in,
    )


# The routes that check or set a password are `async def`: the password work (slow on purpose) runs
# under the hasher's own thread limiter, and their database work runs in the thread pool through
# `run_in_threadpool` (never on the event loop), in sync helpers that open the connection themselves.


def check_new_password(password: str, username: str, email: str, settings: Settings) -> None:
    """422 when the password breaks the policy (configurator/core/passwords.py)."""
    problem = password_problem(password, min_length=settings.password_min_length, username=username, email=email)
    if problem is not None:
        details = [{"loc": ["body", "password"], "msg": problem, "type": "password_policy"}]
        raise ApiError(422, "validation_error", problem, details)


@router.post("/register", status_code=201, response_model=AuthResponse, responses=responses(409, 413, 422, 429))
async def register(
    body: RegisterRequest, request: Request, tokens: TokensDep, hasher: HasherDep, settings: SettingsDep
) -> AuthResponse:
    """Create an account and its personal tenant (the account is its owner); returns tokens.

    The password needs `PASSWORD_MIN_LENGTH` characters, must not be a common password or the
    username/email (422). Registrations per client address are limited (429 with Retry-After)."""
    check_new_password(body.password, body.username, str(body.email), settings)
    wait = request.app.state.register_limiter.acquire(client_address(request))
    if wait is not None:
        raise _rate_limited(wait, "too many registrations from this address, try again later")
    password_hash = await hasher.hash_async(body.password)  # outside the transaction
    return await run_in_threadpool(_register, body, tokens, password_hash)


def _register(body: RegisterRequest, tokens: TokenService, password_hash: str) -> AuthResponse:
    email = str(body.email).lower()
    with connection(), unit_of_work(write=True):
        account = system.create_account(body.username, email, password_hash)
        tenant = system.create_tenant(body.tenant_name or f"{body.username}'s workspace", account["id"], "personal")
        pair = _issue_pair(tokens, account["id"], tenant["id"])
    return AuthResponse(account=account, tenant=tenant, role="owner", tokens=pair)


def _find_for_login(login_name: str) -> tuple[dict, str] | None:
    with connection():
        return system.find_account_for_login(login_name) if _storable(login_name) else None


@router.post("/login", response_model=AuthResponse, responses=responses(401, 403, 413, 422, 429))
async def login(body: LoginRequest, request: Request, tokens: TokensDep, hasher: HasherDep) -> AuthResponse:
    """Sign in with username or email. Repeated failures for one account (by either name) or from one
    address get 429 with Retry-After; during it even the right password is refused."""
    state = request.app.state
    address_limiter: Limiter = state.login_address_limiter
    account_limiter: Limiter = state.login_limiter
    address = client_address(request)
    wait = address_limiter.retry_after(address)
    if wait is not None:
        raise _rate_limited(wait, "too many failed logins from this address, try again later")
    login_name = body.username.lower() if "@" in body.username else body.username
    found = await run_in_threadpool(_find_for_login, login_name)
    account, stored_hash = found if found else (None, None)
    # Username and email of one account share a bucket; the attempt is counted before the password is
    # checked, so parallel guesses cannot all pass the check before the first failure is recorded.
    key = ("account", account["id"]) if account else ("name", body.username.strip().lower())
    wait = account_limiter.acquire(key)
    if wait is not None:
        raise _rate_limited(wait, "too many failed logins, try again later")
    valid, new_hash = await hasher.verify_async(body.password, stored_hash)
    if not valid or account is None or account.get("status") != "active":
        address_limiter.hit(address)
        raise unauthorized("wrong username or password", invalid=False)
    account_limiter.reset(key)
    return await run_in_threadpool(_sign_in, account, new_hash, body.tenant_id, tokens)


def _sign_in(account: dict, new_hash: str | None, tenant_id: str | None, tokens: TokenService) -> AuthResponse:
    """After a good password: store an upgraded hash, pick the tenant, issue the tokens."""
    with connection():
        if new_hash:
            system.set_password_hash(account["id"], new_hash)
        memberships = system.account_memberships(account["id"])
        if tenant_id is not None:
            memberships = [m for m in memberships if m["tenant_id"] == tenant_id]
        if not memberships:
            raise forbidden("this account is not a member of any (such) tenant")
        chosen = memberships[0]
        ctx = IsolationContext(chosen["tenant_id"])
        tenant = Scoped(ctx).tenant.get()
        pair = _issue_pair(tokens, account["id"], ctx.tenant_id)
    account.pop("password_hash", None)
    return AuthResponse(account=account, tenant=tenant, role=chosen["role"], tokens=pair)


def _storable(text: str) -> bool:
    return "\x00" not in text


@router.post("/refresh", response_model=TokenPair, responses=responses(401, 413, 422))
def refresh(body: RefreshRequest, tokens: TokensDep, settings: SettingsDep) -> TokenPair:
    """Exchange a refresh token for a new pair of the same session. The old one stops working
    (rotation); presenting a rotated token again revokes every refresh token of the account in that
    tenant, which ends the access tokens of all its sessions there too."""
    try:
        claims = tokens.decode(body.refresh_token, REFRESH)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    if (
        membership_role(claims.account_id, claims.tenant_id) is None
        or not valid_id(claims.jti)
        or not valid_id(claims.session_id)
    ):
        raise unauthorized("refresh token no longer valid")
    ctx = IsolationContext(claims.tenant_id)
    sid = claims.session_id
    access = tokens.issue(ACCESS, claims.account_id, claims.tenant_id, session_id=sid)
    new_refresh = tokens.issue(REFRESH, claims.account_id, claims.tenant_id, session_id=sid)
    try:
        with connection():
            Scoped(ctx).refresh_tokens.rotate(
                claims.jti, claims.account_id, new_refresh.jti, new_refresh.expires_at, session_id=sid
            )
    except NotFound:
        raise unauthorized("refresh token revoked or already used") from None
    return TokenPair(
        access_token=access.token,
        refresh_token=new_refresh.token,
        expires_in=access.expires_in,
        refresh_expires_in=new_refresh.expires_in,
    )


@router.post("/logout", status_code=204, response_class=Response, responses=responses(401, 413, 422))
def logout(body: LogoutRequest, tokens: TokensDep) -> Response:
    """End the refresh token's session: its refresh tokens are revoked and its access tokens stop
    working at once. With `all_sessions`, every session of the account in this tenant ends."""
    try:
        claims = tokens.decode(body.refresh_token, REFRESH)
    except TokenError as exc:
        raise unauthorized(str(exc)) from None
    if not (valid_id(claims.tenant_id) and valid_id(claims.jti) and valid_id(claims.session_id)):
        raise unauthorized("invalid token")
    scoped = Scoped(IsolationContext(claims.tenant_id))
    with connection(), unit_of_work(claims.tenant_id, write=True):
        try:
            scoped.refresh_tokens.revoke(claims.jti)
        except NotFound:
            raise unauthorized("refresh token unknown") from None
        scoped.refresh_tokens.revoke_session(claims.session_id)
        if body.all_sessions:
            scoped.refresh_tokens.revoke_all(claims.account_id)
    return Response(status_code=204)


@router.get("/me", response_model=MeResponse, responses=responses(401))
def me(principal: CurrentPrincipal) -> MeResponse:
    with principal.session() as session:
        account = system.get_account(session.account_id)
        tenant = session.scoped.tenant.get()
        memberships = system.account_memberships(session.account_id)
    return MeResponse(account=account, tenant=tenant, role=session.role, memberships=memberships)


@router.delete("/me", response_model=DeletedCounts, responses=responses(401, 409, 413, 422))
async def delete_me(
    principal: CurrentPrincipal, body: DeleteAccountRequest, hasher: HasherDep, signals: SignalsDep
) -> DeletedCounts:
    """Delete the signed-in account (the password confirms it). Tenants it alone belongs to are
    deleted with all their data, and their replier connections closed (on every replier at once with
    REDIS_URL); its memberships in other tenants are removed. 409 when it is the only owner of a
    tenant that has other members."""
    stored_hash = await run_in_threadpool(_stored_hash_of_member, principal)
    valid, _new_hash = await hasher.verify_async(body.password, stored_hash)
    if not valid:
        raise unauthorized("password does not match")
    return await run_in_threadpool(_delete_account, principal.account_id, signals)


def _stored_hash_of_member(principal: Principal) -> str | None:
    """The password hash of the token's account, once its membership is checked (401 when gone)."""
    with principal.session():
        account = system.get_account(principal.account_id)
        found = system.find_account_for_login(account["username"])
    return found[1] if found else None


def _delete_account(account_id: str, signals: Publisher) -> DeletedCounts:
    """Delete the account, then signal each deleted tenant (also when a later step failed: what was
    deleted is committed). A blocking publish: this runs in a worker thread."""
    deleted: list[str] = []
    try:
        with connection():
            return DeletedCounts(deleted=delete_account(account_id, deleted))
    finally:
        for tenant_id in deleted:
            signals.publish(Signal("tenant", tenant_id))
