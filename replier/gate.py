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

from isolation.ids import hash_api_key, utcnow
from isolation.system import ApiKeyPrincipal, lookup_api_key
from replier import db_jobs
from replier.connections import Connection, new_connection_id
from replier.protocol import API, LEGACY
from replier.stage import Shared, Stage
from replier.store import Store

log = logging.getLogger("replier")

NEGATIVE_CACHE_SECONDS = 0.5
MAX_KEY_CACHE = 100_000


class KeyUsage:
    """Accepted messages per (tenant, key) since the last flush, written in one job."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._counts: Counter = Counter()

    def count(self, tenant_id: str, key_id: str) -> None:
        self._counts[(tenant_id, key_id)] += 1

    async def flush(self) -> None:
        if not self._counts:
            return
        counts, self._counts = dict(self._counts), Counter()
        await self._store.run(db_jobs.record_key_use, counts)


def _credentials(environ: dict) -> tuple[str, str, str | None]:
    """(api key, protocol, platform) from the handshake's headers: API-Server clients send x-apikey
    (and x-platform), legacy clients an Authorization header (and platform)."""
    api_key = environ.get("HTTP_X_APIKEY")
    if api_key:
        return api_key.strip(), API, environ.get("HTTP_X_PLATFORM")
    api_key = environ.get("HTTP_AUTHORIZATION") or ""
    if api_key[:7].lower() == "bearer ":
        api_key = api_key[7:]
    return api_key.strip(), LEGACY, environ.get("HTTP_PLATFORM")


class Gate(Stage):
    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.usage = KeyUsage(shared.store)
        self.accepting = True  # False once draining: connects are refused
        self._key_cache: dict[str, tuple[float, ApiKeyPrincipal | None]] = {}

    @property
    def cached_keys(self) -> int:
        """How many key lookups (hits and misses) the cache holds."""
        return len(self._key_cache)

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        if not self.accepting:
            self._refuse("shutting_down", "server is shutting down")
        self._check_capacity()
        api_key, protocol, platform = _credentials(environ)
        if not api_key:
            self._refuse("missing_key", "missing api key: send it in the x-apikey (or Authorization) header")
        principal = await self.lookup(api_key)
        if principal is None:
            self._refuse("invalid_key", "invalid api key")
        reason = principal.refusal()
        if reason:
            self._refuse(reason.replace(" ", "_"), reason)
        self._check_capacity()  # again: other connects may have completed while the lookup ran
        conn = Connection(
            sid=sid,
            connection_id=new_connection_id(),
            protocol=protocol,
            key_id=principal.key_id,
            tenant_id=principal.tenant_id,
            agent_id=principal.agent_id,
            platform=(platform or "")[:64] or None,
            api_key=api_key,
        )
        self.connections.add(conn)
        self.metrics.connects.labels(protocol).inc()
        self.metrics.connections.labels(protocol).inc()
        log.debug("connection %s accepted (%s, key %s)", conn.connection_id, protocol, principal.key_id)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self.connections.remove(sid)
        if conn is not None:
            self.metrics.connections.labels(conn.protocol).dec()

    def _check_capacity(self) -> None:
        if len(self.connections) >= self.settings.max_connections:
            self._refuse("server_full", f"server full: at most {self.settings.max_connections} connections")

    def _refuse(self, code: str, reason: str) -> None:
        self.metrics.refused.labels(code).inc()
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

    async def check_revocations(self) -> int:
        """Close connections whose key was revoked, deleted or has expired; returns how many."""
        by_tenant = self.connections.keys_by_tenant()
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
                log.info("closing connection %s: its api key is no longer valid", conn.connection_id)
                await self.outbox.close(conn, "key_revoked", "api key revoked or expired; closing")
                self.metrics.revoked_closed.inc()
                closed += 1
        return closed
