"""The connection gate: who may connect (API key, capacity, shutdown), the key cache, revocation, key use.

A connect handler looks the key up (cached for `key_cache_seconds`, a miss for half a second) and
registers the `Connection`; the revocation check closes connections whose key was revoked, deleted or
has expired, and forgets it in the cache. `KeyUsage` counts accepted messages per key between flushes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

from isolation.ids import hash_api_key, utcnow
from isolation.logthrottle import ThrottledLog
from isolation.system import ApiKeyPrincipal, lookup_api_key
from replier import db_jobs
from replier.connections import Connection, new_connection_id
from replier.faults import report
from replier.keyless import KeylessListener
from replier.outbox.server import SESSION_KEY
from replier.protocol import API, LEGACY
from replier.stage import Shared, Stage
from replier.store import Store

log = logging.getLogger("replier")

NEGATIVE_CACHE_SECONDS = 0.5
MAX_KEY_CACHE = 100_000
REFUSAL_LOG_SECONDS = 10.0  # one INFO line per (reason, address) per interval, with a count
QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "key", "token", "access_token"})
KEY_IN_QUERY = (
    "api keys are not accepted in the query string (servers and proxies log URLs): "
    "send it in the x-apikey (or Authorization) header"
)


def key_hint(api_key: str) -> str:
    """What a log line may say about a presented key: at most the first 8 characters of an `mtk_` key."""
    if not api_key:
        return "none"
    return api_key[:8] if api_key.startswith("mtk_") else "not an mtk_ key"


def _query_has_key(environ: dict) -> bool:
    """Whether the handshake URL's query string carries something named like an API key."""
    query = environ.get("QUERY_STRING") or ""
    return any(name.lower() in QUERY_KEY_NAMES for name, _ in parse_qsl(query, keep_blank_values=True))


def _address(environ: dict) -> str:
    client = (environ.get("asgi.scope") or {}).get("client")
    return client[0] if client else "unknown"


class KeyUsage:
    """Accepted messages per (tenant, key) since the last flush, written in one job."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._counts: Counter = Counter()

    def count(self, tenant_id: str, key_id: str) -> None:
        self._counts[(tenant_id, key_id)] += 1

    async def flush(self) -> None:
        """Write the counts; when that fails (an outage), they are kept for the next flush."""
        if not self._counts:
            return
        counts, self._counts = dict(self._counts), Counter()
        try:
            await self._store.run(db_jobs.record_key_use, counts)
        except Exception:
            self._counts.update(counts)
            raise


def _credentials(environ: dict) -> tuple[str, str, str | None]:
    """(api key, protocol, platform) from the handshake's headers: API-Server clients send x-apikey
    (and x-platform), legacy clients an Authorization header (and platform). Without a key, an
    x-platform or x-uuid header marks an API-Server client (the keyless listener serves both)."""
    api_key = environ.get("HTTP_X_APIKEY")
    if api_key:
        return api_key.strip(), API, environ.get("HTTP_X_PLATFORM")
    api_key = environ.get("HTTP_AUTHORIZATION") or ""
    if api_key[:7].lower() == "bearer ":
        api_key = api_key[7:]
    if not api_key.strip() and (environ.get("HTTP_X_PLATFORM") or environ.get("HTTP_X_UUID")):
        return "", API, environ.get("HTTP_X_PLATFORM")
    return api_key.strip(), LEGACY, environ.get("HTTP_PLATFORM")


class Gate(Stage):
    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.usage = KeyUsage(shared.store)
        self.accepting = True  # False once draining: connects are refused
        self._key_cache: dict[str, tuple[float, ApiKeyPrincipal | None]] = {}
        self.refusals = ThrottledLog(log, REFUSAL_LOG_SECONDS)
        self.keyless: KeylessListener | None = None  # set when KEYLESS_LISTEN is on (replier.keyless)

    @property
    def cached_keys(self) -> int:
        """How many key lookups (hits and misses) the cache holds."""
        return len(self._key_cache)

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        api_key, protocol, platform = _credentials(environ)
        scope = environ.get("asgi.scope") or {}
        keyless = not api_key and self.keyless is not None and self.keyless.serves(scope)
        if keyless:
            api_key = self.keyless.secret  # the socket, never a header, decides (see replier.keyless)
        named = platform or environ.get("HTTP_X_PLATFORM") or environ.get("HTTP_PLATFORM")  # either, for the log
        who = (_address(environ), (named or "")[:64] or "-", "keyless listener" if keyless else key_hint(api_key))
        if not self.accepting:
            self._refuse("shutting_down", "server is shutting down", who)
        self._check_capacity(who)
        if not api_key:
            if _query_has_key(environ):
                self._refuse("key_in_query", KEY_IN_QUERY, who)
            self._refuse("missing_key", "missing api key: send it in the x-apikey (or Authorization) header", who)
        try:
            principal = await self.lookup(api_key)
        except Exception as exc:
            fault = report(exc, "api key lookup")
            if fault is None:
                raise
            # An outage is not the client's fault: a retryable reason, no traceback per connect.
            self.metrics.refused.labels(fault.code).inc()
            self.outbox.refuse(f"{fault.code}: {fault.message} (retryable)")
        if principal is None:
            self._refuse("invalid_key", "invalid api key", who)
        who = (who[0], who[1], f"key id {principal.key_id}")
        reason = principal.refusal()
        if reason:
            self._refuse(reason.replace(" ", "_"), reason, who)
        await self.limits.load(principal.tenant_id)
        self._check_capacity(who)  # again: other connects may have completed while the lookup ran
        refused = await self.limits.connection_refusal(principal.tenant_id)  # suspended, or at its connections limit
        if refused is not None:
            self._refuse(*refused, who)
        conn = Connection(
            sid=sid,
            connection_id=new_connection_id(),
            protocol=protocol,
            key_id=principal.key_id,
            tenant_id=principal.tenant_id,
            agent_id=principal.agent_id,
            platform=(platform or "")[:64] or None,
            api_key="" if keyless else api_key,  # never echo the listener's key to a client that did not send it
        )
        self.connections.add(conn)
        session = scope.get(SESSION_KEY)
        if session is not None:
            session.tenant_id = principal.tenant_id  # its large messages count against this tenant (edge)
        self.limits.connected(conn.tenant_id)
        self.metrics.connects.labels(protocol).inc()
        self.metrics.connections.labels(protocol).inc()
        log.debug(
            "connection %s accepted (%s, key %s%s)",
            conn.connection_id,
            protocol,
            principal.key_id,
            ", keyless listener" if keyless else "",
        )

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self.connections.remove(sid)
        if conn is not None:
            self.metrics.connections.labels(conn.protocol).dec()
            await self.limits.disconnected(conn.tenant_id)

    def _check_capacity(self, who: tuple[str, str, str]) -> None:
        if len(self.connections) >= self.settings.max_connections:
            self._refuse("server_full", f"server full: at most {self.settings.max_connections} connections", who)

    def _refuse(self, code: str, reason: str, who: tuple[str, str, str]) -> None:
        """Count, log (throttled per reason and address) and refuse; `who` is (address, platform, key hint)."""
        self.metrics.refused.labels(code).inc()
        address, platform, key = who
        self.refusals.log(
            code, address, "refused connection from %s: %s (platform %s, key %s)", address, code, platform, key
        )
        self.outbox.refuse(reason)

    async def lookup(self, secret: str) -> ApiKeyPrincipal | None:
        """The key's principal (None: unknown), from the cache while fresh."""
        digest = hash_api_key(secret)
        now = time.monotonic()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await self.store.run(lookup_api_key, secret)
        ttl = self.settings.key_cache_seconds if principal is not None else NEGATIVE_CACHE_SECONDS
        if len(self._key_cache) > MAX_KEY_CACHE:
            self._key_cache.clear()
        self._key_cache[digest] = (now + ttl, principal)
        return principal

    def forget_cached(self, tenant_id: str, *, key_id: str | None = None, agent_id: str | None = None) -> int:
        """Drop cached lookups of the tenant's keys (only `key_id`'s, or only `agent_id`'s, when given),
        so the next connect with them reads the database; returns how many."""
        stale = [
            digest
            for digest, (_, principal) in self._key_cache.items()
            if principal is not None
            and principal.tenant_id == tenant_id
            and (key_id is None or principal.key_id == key_id)
            and (agent_id is None or principal.agent_id == agent_id)
        ]
        for digest in stale:
            del self._key_cache[digest]
        return len(stale)

    async def check_revocations(self, tenant_id: str | None = None) -> int:
        """Close connections whose key was revoked, deleted or has expired; returns how many.

        `tenant_id`: only that tenant's connections (a change signal named it, `replier.signals`);
        None: every open connection (the periodic check).
        """
        by_tenant = self.connections.keys_by_tenant()
        if tenant_id is not None:
            by_tenant = {tenant_id: by_tenant[tenant_id]} if tenant_id in by_tenant else {}
        if not by_tenant:
            return 0
        statuses = await self.store.run(db_jobs.key_statuses, by_tenant)
        now = utcnow()
        closed = 0
        for (tenant_id, key_id), row in statuses.items():
            if row is not None and row["status"] == "active" and (row["expires_at"] is None or row["expires_at"] > now):
                continue
            for digest, (_, principal) in list(self._key_cache.items()):
                if principal is not None and principal.key_id == key_id and principal.tenant_id == tenant_id:
                    del self._key_cache[digest]
            for conn in self.connections.with_key(tenant_id, key_id):
                log.info(
                    "closing connection %s: its api key is no longer valid (platform %s, key id %s)",
                    conn.connection_id,
                    conn.platform or "-",
                    key_id,
                )
                await self.outbox.close(conn, "key_revoked", "api key revoked or expired; closing")
                self.metrics.revoked_closed.inc()
                closed += 1
        return closed
