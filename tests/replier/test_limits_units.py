"""`replier.limits.TenantLimiter` in-process on the leg's database: the refresh's bookkeeping (idle
tenants forgotten, presence reported and cleared, a deleted tenant skipped) and the per-tenant gauges'
bounded label set."""

from __future__ import annotations

import asyncio
import uuid

import socketio
from replier_support import make_tenant

from isolation import IsolationContext, Scoped
from isolation.cleanup import delete_tenant
from isolation.ids import utcnow
from replier import limits as limits_module
from replier.connections import Connection, ConnectionRegistry, new_connection_id
from replier.core.config import ReplierSettings
from replier.limits import TenantLimiter, report_presence
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.store import Store


def _conn(ta) -> Connection:
    return Connection(
        sid=uuid.uuid4().hex,
        connection_id=new_connection_id(),
        protocol="api",
        key_id=ta.key_id,
        tenant_id=ta.tenant_id,
        agent_id=ta.agent_id,
        platform="qq",
        api_key=ta.secret,
    )


async def _with_limiter(scenario, **settings):
    store = Store(workers=1, batch_max=16, checkpoint_seconds=0)
    store.start()
    metrics = Metrics()
    connections = ConnectionRegistry()
    outbox = Outbox(socketio.AsyncServer(async_mode="asgi"), metrics)
    limiter = TenantLimiter(ReplierSettings(**settings), store, metrics, connections, outbox)
    try:
        return await scenario(limiter, metrics)
    finally:
        await asyncio.to_thread(store.stop)


def _gauge(metrics: Metrics, name: str, tenant: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"tenant": tenant})


def _connections(tenant_id: str) -> int:
    return Scoped(IsolationContext(tenant_id)).tenant.usage_since(utcnow(), utcnow().replace(year=2000))["connections"]


def test_refresh_reports_presence_forgets_idle_tenants_and_bounds_tenant_labels(configured_db, monkeypatch):
    first, second = make_tenant(), make_tenant()
    for ta in (first, second):
        Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"tokens_per_day": 100})

    async def scenario(limiter: TenantLimiter, metrics: Metrics):
        for ta in (first, second):
            await limiter.load(ta.tenant_id)
            limiter.connected(ta.tenant_id)
        limiter.spend(second.tenant_id, 60)
        await limiter.refresh()
        reported = (_connections(first.tenant_id), _connections(second.tenant_id))
        labelled = (
            _gauge(metrics, "replier_tenant_budget_used_ratio", first.tenant_id),
            _gauge(metrics, "replier_tenant_budget_used_ratio", second.tenant_id),
            _gauge(metrics, "replier_tenant_tokens_used", first.tenant_id),
        )
        await limiter.disconnected(first.tenant_id)
        monkeypatch.setattr(limits_module, "CONTROL_KEEP_SECONDS", -1.0)
        await limiter.refresh()
        return reported, labelled, set(limiter._entries), _connections(first.tenant_id)

    reported, labelled, kept, first_after = asyncio.run(_with_limiter(scenario, metrics_tenant_labels=1))
    assert reported == (1, 1)
    # One label (METRICS_TENANT_LABELS=1): the tenant that used the larger share of its budget.
    assert labelled == (None, 0.6, None)
    assert kept == {second.tenant_id}  # the tenant without connections was forgotten
    assert first_after == 0  # its presence was reported as gone


def test_presence_of_a_deleted_tenant_is_skipped(configured_db):
    kept, gone = make_tenant(), make_tenant()
    delete_tenant(gone.tenant_id)
    report_presence("rep_test", {gone.tenant_id: 2, kept.tenant_id: 1})
    assert _connections(kept.tenant_id) == 1


def test_unknown_tenants_get_the_defaults_and_the_throttle_counts_reset_with_the_budget_day(configured_db):
    ta = make_tenant()

    async def scenario(limiter: TenantLimiter, metrics: Metrics):
        assert await limiter.connection_refusal("ten_never_loaded") is None  # defaults, not suspended
        Scoped(IsolationContext(ta.tenant_id)).tenant.set_limits({"connections": 1})
        await limiter.load(ta.tenant_id)
        limiter.connected(ta.tenant_id)
        refused = await limiter.connection_refusal(ta.tenant_id)
        await limiter.refresh()
        throttled = _gauge(metrics, "replier_tenant_throttled", ta.tenant_id)
        limiter._throttled_window = -1.0  # as if a new budget day began
        await limiter.refresh()
        return refused, throttled, _gauge(metrics, "replier_tenant_throttled", ta.tenant_id)

    refused, throttled, after = asyncio.run(_with_limiter(scenario))
    assert refused[0] == "tenant_connections"
    assert throttled == 1 and after == 0
