"""Passwords (Argon2id via pwdlib) and JWTs (PyJWT, HS256).

Access and refresh tokens are both JWTs with `sub` (account id), `tid` (tenant id), `sid` (session
id), `iat`, `exp`, `jti`, `iss`, `aud` and `typ`. They differ in audience and type, so one can never
be used as the other. A refresh token's `jti` is stored (``refresh_tokens``) so logout and rotation
can revoke it. The session id is created at sign-in, kept by every rotation and stored with each
refresh token: an access token is accepted only while its session still has a live refresh token
(checked with the membership, configurator/api/deps.py), so logout ends its access tokens at once.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio.to_thread
import jwt
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from configurator.core.config import Settings

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"
_REQUIRED_CLAIMS = ["sub", "tid", "sid", "iat", "exp", "jti", "iss", "aud", "typ"]


def new_session_id() -> str:
    """A random id for one sign-in (login or registration), shared by all its tokens."""
    return secrets.token_urlsafe(16)


class TokenError(Exception):
    """A token is missing, malformed, expired, of the wrong type/audience or badly signed."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    account_id: str
    tenant_id: str
    jti: str
    expires_at: datetime  # naive UTC, like every timestamp in the database
    session_id: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime  # naive UTC
    expires_in: int  # seconds


class PasswordHasher:
    """Argon2id hashing; unknown users are verified against a dummy hash so timing reveals nothing.

    Routes use the `*_async` methods: each hash (~0.1 s of CPU, which Argon2 spends without the GIL)
    runs in a worker thread under a limiter of its own (`PASSWORD_HASH_CONCURRENCY`), not in the
    thread pool of the sync routes, so a burst of logins queues behind itself instead of occupying
    the threads every other request needs.
    """

    def __init__(self, settings: Settings) -> None:
        self._hash = PasswordHash(
            (Argon2Hasher(time_cost=settings.password_hash_time_cost, memory_cost=settings.password_hash_memory_kib),)
        )
        self._dummy: str | None = None
        self._lock = threading.Lock()
        self._concurrency = settings.password_hash_concurrency
        # One limiter per event loop (an anyio limiter belongs to the loop it was made in).
        self._limiter: RunVar[CapacityLimiter] = RunVar(f"password_hash_limiter_{id(self)}")

    def _thread_limiter(self) -> CapacityLimiter:
        try:
            return self._limiter.get()
        except LookupError:
            limiter = CapacityLimiter(self._concurrency)
            self._limiter.set(limiter)
            return limiter

    async def hash_async(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self.hash, password, limiter=self._thread_limiter())

    async def verify_async(self, password: str, password_hash: str | None) -> tuple[bool, str | None]:
        return await anyio.to_thread.run_sync(self.verify, password, password_hash, limiter=self._thread_limiter())

    def hash(self, password: str) -> str:
        return self._hash.hash(password)

    def verify(self, password: str, password_hash: str | None) -> tuple[bool, str | None]:
        """(valid, new hash when the stored one uses old parameters). `None` hash: a dummy check."""
        if password_hash is None:
            self._hash.verify(password, self._dummy_hash())
            return False, None
        try:
            return self._hash.verify_and_update(password, password_hash)
        except Exception:  # an unreadable stored hash never authenticates
            return False, None

    def _dummy_hash(self) -> str:
        with self._lock:
            if self._dummy is None:
                self._dummy = self._hash.hash(secrets.token_urlsafe(16))
            return self._dummy


class TokenService:
    """Issues and verifies JWTs.

    Verified access tokens are remembered (up to `VERIFIED_CACHE_SIZE`, keyed by the whole signed
    token) until their `exp`: a client sends the same token with every request for its lifetime, and
    re-checking the signature and claims each time cost about a tenth of a cheap request. Only a
    token that passed every check is stored, expiry is still checked on every use, and nothing but
    the token's own claims comes from the cache (membership and role are read per request).
    """

    VERIFIED_CACHE_SIZE = 4096

    def __init__(self, settings: Settings) -> None:
        self._verified: dict[str, tuple[TokenClaims, int]] = {}
        self._verified_lock = threading.Lock()
        self._key = settings.secret_key
        self._issuer = settings.jwt_issuer
        self._audiences = {ACCESS: settings.jwt_audience, REFRESH: settings.jwt_refresh_audience}
        self._lifetimes = {
            ACCESS: timedelta(minutes=settings.access_token_minutes),
            REFRESH: timedelta(days=settings.refresh_token_days),
        }

    def issue(
        self,
        kind: str,
        account_id: str,
        tenant_id: str,
        now: datetime | None = None,
        *,
        session_id: str | None = None,
    ) -> IssuedToken:
        """A signed token of the sign-in session `session_id` (a new session when None)."""
        now = now or datetime.now(UTC)
        lifetime = self._lifetimes[kind]
        expires = now + lifetime
        jti = secrets.token_urlsafe(16)
        claims = {
            "sub": account_id,
            "tid": tenant_id,
            "sid": session_id or new_session_id(),
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "jti": jti,
            "iss": self._issuer,
            "aud": self._audiences[kind],
            "typ": kind,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        expires_naive = datetime.fromtimestamp(claims["exp"], UTC).replace(tzinfo=None)
        return IssuedToken(token, jti, expires_naive, int(lifetime.total_seconds()))

    def decode(self, token: str, kind: str) -> TokenClaims:
        if not token or len(token) > 4096:
            raise TokenError("malformed token")
        if kind == ACCESS:
            hit = self._verified.get(token)
            if hit is not None:
                claims, exp = hit
                if time.time() < exp:
                    return claims
                with self._verified_lock:
                    self._verified.pop(token, None)
                raise TokenError("token expired")
        claims = self._verify(token, kind)
        if kind == ACCESS:
            with self._verified_lock:
                while len(self._verified) >= self.VERIFIED_CACHE_SIZE:  # evict the oldest entries
                    self._verified.pop(next(iter(self._verified)))
                self._verified[token] = (claims, int(claims.expires_at.replace(tzinfo=UTC).timestamp()))
        return claims

    def _verify(self, token: str, kind: str) -> TokenClaims:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._audiences[kind],
                issuer=self._issuer,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError("invalid token") from exc
        if claims.get("typ") != kind:
            raise TokenError("wrong token type")
        sub, tid, jti, sid = claims.get("sub"), claims.get("tid"), claims.get("jti"), claims.get("sid")
        if not all(isinstance(v, str) and v for v in (sub, tid, jti, sid)):
            raise TokenError("invalid token")
        expires = datetime.fromtimestamp(int(claims["exp"]), UTC).replace(tzinfo=None)
        return TokenClaims(sub, tid, jti, expires, sid)
