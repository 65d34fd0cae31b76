"""Per-tenant limits in the replier: suspension, connections, message rates and the token budget.

What is enforced where (the limits and their defaults: `isolation.limits`):
- **connect** (`replier.gate`): a suspended tenant is refused (`tenant_suspended`), and so is a tenant
  already at its `connections` limit (`tenant_connections`); both reasons reach the client as the
  Socket.IO connect refusal and count in `replier_connections_refused{reason}`.
- **message accepted** (`replier.inbound`, after parsing, before the stream queue): over the agent's
  or the tenant's `*messages_per_minute` in the current window, the sender gets a `rate_limited`
  error about that message in its protocol (API-Server `custom_error`, legacy error MessageBase),
  routed to the message's chat and with `retry_after` (seconds until the window resets). Nothing of
  the message is stored and nothing goes to the model; refused messages do not count toward the
  limit. A refused message gets that error instead of an acknowledgement wherever acknowledgements
  mean "stored" (until then API-Server clients may see the envelope's `sys_ack` first: it only says
  the frame was read).
- **before the model** (`replier.answer`): a tenant whose tokens of the budget day reached
  `tokens_per_day` gets a reply with the text `QUOTA_REPLY` and metadata `outcome`/`error`
  `quota_exceeded` and `retry_after`, sent to the stream like any reply but not stored (no reply row,
  no `llm_usage` row: it is counted in the metrics); the model is not called. The user's message was
  stored when it was taken in, unanswered, so a resend after the budget day gets it answered. The
  check is "used < budget": the call that crosses the budget completes. Tokens are those `llm_usage`
  records (memory extraction calls are not counted). Offline agents use no tokens and are not limited.

Message rates are counted in Redis with REDIS_URL (`isolation.redis_counter.AsyncRedisWindowCounter`,
awaited on the loop: one count for every replier), else, and during a Redis outage, in this process
(`FixedWindowCounter`, bounded: least recent keys dropped beyond 100,000). Connections are counted
in Redis too with REDIS_URL (`replier.connection_counts`: one limit for every replier), else, and
while Redis fails, in this process. The token
budget is seeded from the tenant's `llm_usage` rows of the budget day when its limits are first
loaded and at each new budget day, so a restart does not reset it. With REDIS_URL (several
repliers) it is also read again every `TOKEN_BUDGET_SYNC_SECONDS` for tenants with open connections,
so what the other repliers spent counts here within that time: a tenant can overspend its budget by
at most what the others spend in one such interval (the database's `llm_usage` rows are the one
count; nothing of the budget is kept in Redis). Operators' overrides and
suspensions reach this replier at once as a "tenant" change signal (REDIS_URL, `reload`), and are
re-read every `LIMITS_REFRESH_SECONDS` for every tenant with open connections (one
`mt_tenant_controls` round trip; the fallback without Redis); a suspended tenant's connections are
closed then. Each refresh also reports this process's open connections per tenant
(`replier_presence`, for the usage endpoints) when they changed, and all of them every
`PRESENCE_HEARTBEAT_SECONDS`.

Metrics: `replier_throttled_total{limit}` (a fixed set of names), and per tenant, for at most
`METRICS_TENANT_LABELS` tenants (those with open connections that used the largest share of their
budget, then the most tokens; the label set is rebuilt at each refresh, so it never grows beyond that):
`replier_tenant_tokens_used{tenant}`, `replier_tenant_budget_used_ratio{tenant}`,
`replier_tenant_throttled{tenant}`; `replier_tenants_over_budget` counts all of them without a label.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from isolation import NotFound, Scoped
from isolation.context import IsolationContext
from isolation.limits import (
    PRESENCE_HEARTBEAT_SECONDS,
    FixedWindowCounter,
    TenantControl,
    TenantLimits,
    effective,
    window_start,
)
from isolation.operators import tenant_controls
from isolation.redis_counter import AsyncRedisWindowCounter, async_client
from replier.connection_counts import SharedConnectionCounts
from replier.connections import Connection, ConnectionRegistry
from replier.core.config import ReplierSettings
from replier.logthrottle import ThrottledLog
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.protocol import Inbound
from replier.reply import Reply, build_reply
from replier.store import Store

log = logging.getLogger("replier")

QUOTA_REPLY = "Sorry, this service has used its language model budget for today. Please try again later."
SUSPENDED_REASON = "this tenant is suspended by the operator"
THROTTLE_LOG_SECONDS = 60.0  # one WARNING per (limit, tenant) and interval
MAX_THROTTLED_TENANTS = 100_000  # tenants with a throttle count in the budget day (metrics only)
CONTROL_KEEP_SECONDS = 30.0  # a tenant without connections keeps its loaded limits this long
THROTTLED = ("messages_per_minute", "agent_messages_per_minute", "tokens_per_day", "connections", "suspended")


@dataclass(slots=True)
class _Entry:
    control: TenantControl
    limits: TenantLimits
    loaded_at: float


QUOTA_OUTCOME = "quota_exceeded"


def quota_reply(
    inbound: Inbound,
    *,
    stream_id: str,
    agent_name: str,
    user_name: str | None,
    provider: str,
    model: str | None,
    max_memories: int,
    retry_after: int,
) -> Reply:
    """The reply of a tenant over its token budget: `QUOTA_REPLY`, with metadata `outcome` and
    `error` `quota_exceeded` and `retry_after` (seconds until the budget day ends)."""
    reply = build_reply(
        inbound,
        stream_id=stream_id,
        agent_name=agent_name,
        user_name=user_name,
        max_memories=max_memories,
        text=QUOTA_REPLY,
        provider=provider,
        model=model,
        outcome=QUOTA_OUTCOME,
        latency_ms=0,
    )
    reply.metadata.update(error=QUOTA_OUTCOME, retry_after=retry_after)
    return reply


def is_quota_reply(reply: Reply) -> bool:
    """A quota reply is sent but not stored: it is no turn of the conversation, and it has no usage row
    (it is counted in `replier_throttled_total{limit="tokens_per_day"}`). The user's message stays in
    the history unanswered, so sending it again once the budget allows gets it answered."""
    return reply.metadata.get("outcome") == QUOTA_OUTCOME


# ---- database jobs (run in the store's worker threads) ----------------------------------------
def tokens_used(tenant_ids: list[str], since_epoch: float) -> dict[str, int]:
    """Each tenant's LLM tokens since `since_epoch` (the start of its budget day)."""
    since = _naive_utc(since_epoch)
    return {t: Scoped(IsolationContext(t)).tenant.tokens_since(since) for t in tenant_ids}


def report_presence(process_id: str, counts: dict[str, int]) -> None:
    """This process's open connections per tenant (a tenant deleted meanwhile is skipped)."""
    for tenant_id, count in counts.items():
        try:
            Scoped(IsolationContext(tenant_id)).tenant.report_connections(process_id, count)
        except NotFound:
            log.debug("tenant %s is gone; its presence is not reported", tenant_id)


def _naive_utc(epoch: float) -> datetime:
    """The database's timestamps are naive UTC."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


class TenantLimiter:
    """The replier's per-tenant limits; one per process, shared by the gate, intake and answerer."""

    def __init__(
        self,
        settings: ReplierSettings,
        store: Store,
        metrics: Metrics,
        connections: ConnectionRegistry,
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.connections = connections
        self.outbox = outbox
        self.process_id = "rep_" + secrets.token_hex(8)
        self.messages = FixedWindowCounter()  # without REDIS_URL; with it, the fallback during an outage
        # With REDIS_URL the message rates and the connections are one count for every replier.
        self.shared_messages: AsyncRedisWindowCounter | None = None
        self.shared_connections: SharedConnectionCounts | None = None
        self._redis = async_client(settings.redis_url) if settings.redis_url else None
        if self._redis is not None:
            self.shared_messages = AsyncRedisWindowCounter(self._redis, settings.redis_prefix, fallback=self.messages)
            self.shared_connections = SharedConnectionCounts(self._redis, settings.redis_prefix, self.process_id)
        self.tokens = FixedWindowCounter()
        self.open: Counter[str] = Counter()  # open connections per tenant
        self._entries: dict[str, _Entry] = {}
        self._reported: dict[str, int] = {}
        self._heartbeat_at = 0.0
        self._budget_synced_at = time.monotonic()
        self._throttled: Counter[str] = Counter()  # per tenant, in the current budget window (metrics)
        self._throttled_window = window_start(time.time(), settings.token_budget_window_seconds)
        self._log = ThrottledLog(log, THROTTLE_LOG_SECONDS, logging.WARNING)

    # -- limits of a tenant -----------------------------------------------------------------
    def limits(self, tenant_id: str) -> TenantLimits:
        entry = self._entries.get(tenant_id)
        return entry.limits if entry is not None else effective({}, self.settings)

    def suspended(self, tenant_id: str) -> bool:
        entry = self._entries.get(tenant_id)
        return entry is not None and entry.control.suspended

    async def load(self, tenant_id: str) -> None:
        """Make sure the tenant's limits are loaded (and its budget seeded), at connect.

        A tenant with open connections is kept current by `refresh`; for any other the limits are
        read again when older than the refresh interval (a suspension may have been lifted)."""
        entry = self._entries.get(tenant_id)
        if entry is not None and (
            tenant_id in self.open or time.monotonic() - entry.loaded_at < self.settings.limits_refresh_seconds
        ):
            return
        controls = await self.store.run(tenant_controls, [tenant_id])
        self._apply(controls)
        await self._seed([tenant_id])

    async def reload(self, tenant_id: str) -> int:
        """The operator changed the tenant (a signal said so, `replier.signals`): read its limits and
        status now and close its connections here if it is suspended. A deleted tenant is forgotten
        (its connections are closed by the revocation check: their keys are gone). Returns how many
        connections were closed."""
        controls = await self.store.run(tenant_controls, [tenant_id])
        if tenant_id not in controls:
            self._entries.pop(tenant_id, None)
            return 0
        self._apply(controls)
        if self.suspended(tenant_id):
            return await self._close_tenant(tenant_id)
        if tenant_id in self.open:
            await self._seed([tenant_id])
        return 0

    async def heartbeat(self) -> None:
        """Keep this replier's connection counts alive in Redis (`replier.connection_counts`)."""
        if self.shared_connections is not None:
            await self.shared_connections.heartbeat(dict(self.open))

    async def aclose(self) -> None:
        if self.shared_connections is not None:
            await self.shared_connections.leave(dict(self.open))
        if self._redis is not None:
            await self._redis.aclose()

    def _apply(self, controls: dict[str, TenantControl]) -> None:
        now = time.monotonic()
        for tenant_id, control in controls.items():
            self._entries[tenant_id] = _Entry(control, control.limits(self.settings), now)

    # -- connections --------------------------------------------------------------------------
    async def connection_refusal(self, tenant_id: str) -> tuple[str, str] | None:
        """(code, reason) when the tenant may not open another connection now.

        With REDIS_URL the tenant's connections on every replier count (and None means this one was
        counted there: the caller must then call `connected`, with no await in between); when Redis
        fails, this replier's own count decides."""
        if self.suspended(tenant_id):
            self._throttle(tenant_id, "suspended", 0)
            return "tenant_suspended", SUSPENDED_REASON
        limit = self.limits(tenant_id).connections
        counted = None
        if self.shared_connections is not None:
            counted = await self.shared_connections.admit(tenant_id, limit, dict(self.open))
        if counted is False or (counted is None and limit and self.open[tenant_id] >= limit):
            self._throttle(tenant_id, "connections", limit)
            return "tenant_connections", f"this tenant already has its limit of {limit} open connections"
        return None

    def connected(self, tenant_id: str) -> None:
        self.open[tenant_id] += 1

    async def disconnected(self, tenant_id: str) -> None:
        self.open[tenant_id] -= 1
        if self.open[tenant_id] <= 0:
            del self.open[tenant_id]
        if self.shared_connections is not None:
            await self.shared_connections.release(tenant_id)

    # -- messages -----------------------------------------------------------------------------
    async def admit(self, conn: Connection, inbound: Inbound) -> bool:
        """Count the message against the agent's and the tenant's rates; False (and the sender told
        `rate_limited` or `tenant_suspended`) when it may not go on."""
        tenant_id = conn.tenant_id
        if self.suspended(tenant_id):
            self._throttle(tenant_id, "suspended", 0)
            await self.outbox.reply_error(conn, inbound, "tenant_suspended", SUSPENDED_REASON)
            return False
        limits = self.limits(tenant_id)
        window = self.settings.limit_window_seconds
        checks = [
            (("agent", tenant_id, conn.agent_id), limits.agent_messages_per_minute),
            (("tenant", tenant_id), limits.messages_per_minute),
        ]
        if self.shared_messages is not None:
            refusal = await self.shared_messages.take(checks, window)
        else:
            refusal = self.messages.take(checks, window)
        if refusal is None:
            return True
        name = ("agent_messages_per_minute", "messages_per_minute")[refusal.index]
        value = checks[refusal.index][1]
        seconds = refusal.retry_after_seconds
        self._throttle(tenant_id, name, value)
        whose = "this agent" if refusal.index == 0 else "this tenant"
        await self.outbox.reply_error(
            conn,
            inbound,
            "rate_limited",
            f"{whose} may send {value} messages per {window:g} s; try again in {seconds} s",
            details={"limit": name, "retry_after": seconds},
        )
        return False

    # -- the token budget ---------------------------------------------------------------------
    def _budget_key(self, tenant_id: str) -> tuple[str, str]:
        return ("tokens", tenant_id)

    def over_budget(self, tenant_id: str) -> int | None:
        """Seconds until the budget day ends when the tenant used its tokens, else None (counted as
        throttled when over)."""
        limit = self.limits(tenant_id).tokens_per_day
        window = self.settings.token_budget_window_seconds
        if not limit or self.tokens.count(self._budget_key(tenant_id), window) < limit:
            return None
        self._throttle(tenant_id, "tokens_per_day", limit)
        now = time.time()
        return max(1, int(window_start(now, window) + window - now + 0.999))

    def spend(self, tenant_id: str, tokens: int) -> None:
        if tokens > 0:
            self.tokens.add(self._budget_key(tenant_id), self.settings.token_budget_window_seconds, tokens)

    async def _seed(self, tenant_ids: list[str], again: bool = False) -> None:
        """Read the budget day's tokens of tenants with a budget that were not seeded in this window
        (`again`: of every one of them, to see what other repliers spent). The count only rises: it
        becomes the larger of the database's total and this process's own count."""
        window = self.settings.token_budget_window_seconds
        todo = [
            t
            for t in tenant_ids
            if self.limits(t).tokens_per_day and (again or not self.tokens.has(self._budget_key(t), window))
        ]
        if not todo:
            return
        since = window_start(time.time(), window)
        for tenant_id, used in (await self.store.run(tokens_used, todo, since)).items():
            self.tokens.raise_to(self._budget_key(tenant_id), window, used)

    # -- throttling: one metric, one log line -------------------------------------------------
    def _throttle(self, tenant_id: str, limit: str, value: int) -> None:
        self.metrics.throttled.labels(limit).inc()
        if len(self._throttled) >= MAX_THROTTLED_TENANTS and tenant_id not in self._throttled:
            self._throttled.clear()  # bounded memory; the per-tenant gauges start again
        self._throttled[tenant_id] += 1
        self._log.log(limit, tenant_id, "tenant %s throttled: %s (limit %d)", tenant_id, limit, value)

    # -- the periodic refresh (replier.service) -----------------------------------------------
    async def refresh(self) -> None:
        """Re-read limits and status of tenants with connections, close suspended tenants'
        connections, seed new budget days, report presence and update the per-tenant metrics."""
        now = time.monotonic()
        for tenant_id in [t for t, e in self._entries.items() if t not in self.open]:
            if now - self._entries[tenant_id].loaded_at > CONTROL_KEEP_SECONDS:
                del self._entries[tenant_id]
        active = sorted(self.open)
        if active:
            controls = await self.store.run(tenant_controls, active)
            self._apply(controls)
            for tenant_id in active:
                if self.suspended(tenant_id):
                    await self._close_tenant(tenant_id)
            await self._seed(active)
            # Several repliers (REDIS_URL): each counts the tokens it spends itself; what the others
            # spent reaches it from their `llm_usage` rows, read again every `token_budget_sync_seconds`.
            if self.settings.redis_url and now - self._budget_synced_at >= self.settings.token_budget_sync_seconds:
                self._budget_synced_at = now
                await self._seed(active, again=True)
        await self._report_presence(now)
        self._update_metrics(active)

    async def _close_tenant(self, tenant_id: str) -> int:
        conns = [c for c in self.connections.by_sid.values() if c.tenant_id == tenant_id]
        if conns:
            log.info("closing %d connections of suspended tenant %s", len(conns), tenant_id)
        for conn in conns:
            await self.outbox.close(conn, "tenant_suspended", SUSPENDED_REASON)
        return len(conns)

    async def _report_presence(self, now: float) -> None:
        heartbeat = now - self._heartbeat_at >= PRESENCE_HEARTBEAT_SECONDS
        current = dict(self.open)
        changed = {t: n for t, n in current.items() if heartbeat or self._reported.get(t) != n}
        changed.update({t: 0 for t in self._reported if t not in current})
        if not changed:
            return
        await self.store.run(report_presence, self.process_id, changed)
        self._reported = current
        if heartbeat:
            self._heartbeat_at = now

    def _update_metrics(self, active: list[str]) -> None:
        window = self.settings.token_budget_window_seconds
        start = window_start(time.time(), window)
        if start != self._throttled_window:
            self._throttled.clear()
            self._throttled_window = start
        rows = []
        for tenant_id in active:
            used = self.tokens.count(self._budget_key(tenant_id), window)
            limit = self.limits(tenant_id).tokens_per_day
            rows.append(((used / limit) if limit else 0.0, used, tenant_id))
        self.metrics.tenants_over_budget.set(sum(1 for ratio, _, _ in rows if ratio >= 1))
        rows.sort(reverse=True)
        for gauge in (self.metrics.tenant_tokens, self.metrics.tenant_budget_ratio, self.metrics.tenant_throttled):
            gauge.clear()
        for ratio, used, tenant_id in rows[: self.settings.metrics_tenant_labels]:
            self.metrics.tenant_tokens.labels(tenant_id).set(used)
            self.metrics.tenant_budget_ratio.labels(tenant_id).set(ratio)
            self.metrics.tenant_throttled.labels(tenant_id).set(self._throttled.get(tenant_id, 0))
