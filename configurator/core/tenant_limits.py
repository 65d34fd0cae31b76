"""The configurator's share of the per-tenant limits: suspension and requests per tenant.

Every authenticated tenant request goes through `Principal.session` (configurator/api/deps.py),
which reads the membership, the tenant's status and its request-limit override in one statement and
then asks `RestLimits.admit`: a suspended tenant gets 403 `tenant_suspended`; a tenant over
`requests_per_minute` (its override, else `TENANT_REQUESTS_PER_MINUTE`) in the current window
(`LIMIT_WINDOW_SECONDS`) gets 429 `rate_limited` with `Retry-After`. Requests refused for the limit
are not counted. With REDIS_URL the count is in Redis (`isolation.redis_counter.RedisWindowCounter`:
one count per tenant for every worker and host; during a Redis outage each worker counts on its own);
without it, per configurator process (`isolation.limits.FixedWindowCounter`). The count is a blocking
call: `Principal.session` runs in the route's worker thread, never on the event loop. Login,
registration and token refresh are not tenant requests (they have their own limits,
configurator/core/ratelimit.py); operator routes do not count toward the operator's own tenant.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC, datetime

from configurator.core.errors import ApiError
from isolation.config import BaseServiceSettings
from isolation.limits import (
    PRESENCE_TTL_SECONDS,
    SUSPENDED,
    FixedWindowCounter,
    WindowCounter,
    defaults,
    effective,
    window_start,
)
from isolation.managers.tenancy import TenantManager

log = logging.getLogger("configurator")

THROTTLE_LOG_SECONDS = 60.0  # one line per tenant and interval when it hits its request limit


class RestLimits:
    def __init__(self, settings: BaseServiceSettings, counter: WindowCounter | None = None) -> None:
        self.default = settings.tenant_requests_per_minute
        self.window = settings.limit_window_seconds
        self.counter = counter if counter is not None else FixedWindowCounter()
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def limit_for(self, override: int | None) -> int:
        return self.default if override is None else override

    def admit(self, tenant_id: str, status: str, override: int | None) -> None:
        """403 for a suspended tenant, 429 beyond its request limit; otherwise the request is counted."""
        if status == SUSPENDED:
            raise ApiError(403, "tenant_suspended", "this tenant is suspended by the operator")
        limit = self.limit_for(override)
        refusal = self.counter.take([(("requests", tenant_id), limit)], self.window)
        if refusal is None:
            return
        seconds = refusal.retry_after_seconds
        self._log(tenant_id, limit)
        raise ApiError(
            429,
            "rate_limited",
            f"this tenant sent more than {limit} requests in {self.window:g} s; try again in {seconds} s",
            {"limit": "requests_per_minute", "value": limit, "retry_after": seconds},
            headers={"Retry-After": str(seconds)},
        )

    def _log(self, tenant_id: str, limit: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(tenant_id, -math.inf) < THROTTLE_LOG_SECONDS:
                return
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[tenant_id] = now
        log.warning("tenant %s throttled: over its limit of %d requests per %g s", tenant_id, limit, self.window)


def usage_today(tenant: TenantManager, settings: BaseServiceSettings) -> dict:
    """The tenant's counts since the start of its budget day, and its open replier connections."""
    now = time.time()
    since = datetime.fromtimestamp(window_start(now, settings.token_budget_window_seconds), UTC).replace(tzinfo=None)
    present_after = datetime.fromtimestamp(now - PRESENCE_TTL_SECONDS, UTC).replace(tzinfo=None)
    return tenant.usage_since(since, present_after)


def limits_view(tenant_id: str, overrides: dict[str, int | None], settings: BaseServiceSettings) -> dict:
    """What the limits endpoints show: effective limits, overrides, defaults and the windows."""
    return {
        "tenant_id": tenant_id,
        "limits": effective(overrides, settings).as_dict(),
        "overrides": overrides,
        "defaults": defaults(settings),
        "window_seconds": settings.limit_window_seconds,
        "budget_window_seconds": settings.token_budget_window_seconds,
    }
