"""Per-tenant limits in the isolation library: counting, effective limits, controls across tenants,
usage and presence, and the `invoke create-operator` / `invoke tenant-limits` tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from isolation import IsolationContext, NotFound, Scoped, system
from isolation.config import BaseServiceSettings
from isolation.ids import utcnow
from isolation.limits import LIMIT_NAMES, FixedWindowCounter, check_overrides, defaults, effective, window_start
from isolation.operators import tenant_controls
from isolation.signals import signals_channel
from testsupport.redis_server import require_redis, unique_prefix

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_n_allowed_n_plus_one_refused_and_reset_at_the_window():
    clock = Clock(1000.0)
    counter = FixedWindowCounter(clock=clock)
    assert [counter.take([("k", 3)], 60.0) for _ in range(3)] == [None] * 3
    refusal = counter.take([("k", 3)], 60.0)
    assert refusal is not None and refusal.index == 0 and refusal.retry_after == pytest.approx(20.0)
    assert refusal.retry_after_seconds == 20
    assert counter.count("k", 60.0) == 3  # a refused take counts nothing
    clock.now = 1020.0  # the next window (windows start at multiples of 60)
    assert counter.take([("k", 3)], 60.0) is None and counter.count("k", 60.0) == 1


def test_several_checks_count_together_or_not_at_all():
    counter = FixedWindowCounter(clock=Clock(0.5))
    checks = [("agent", 2), ("tenant", 3)]
    assert counter.take(checks, 10.0) is None
    assert counter.take([("agent-b", 5), ("tenant", 3)], 10.0) is None
    assert counter.take(checks, 10.0) is None  # agent 2/2, tenant 3/3
    refused = counter.take([("agent-b", 5), ("tenant", 3)], 10.0)
    assert refused.index == 1 and counter.count("agent-b", 10.0) == 1
    assert counter.take([("x", 0)], 10.0, amount=10**9) is None  # 0 = unlimited


def test_memory_is_bounded_and_totals_can_be_raised():
    clock = Clock(5.0)
    counter = FixedWindowCounter(max_keys=3, clock=clock)
    for key in "abcd":
        counter.add(key, 100.0, 1)
    assert len(counter) == 3 and counter.count("a", 100.0) == 0  # least recent dropped
    assert counter.raise_to("b", 100.0, 50) == 50 and counter.raise_to("b", 100.0, 10) == 50
    for key in "efg":
        counter.raise_to(key, 100.0, 1)
    assert len(counter) == 3
    assert counter.has("g", 100.0) and not counter.has("b", 100.0)
    clock.now = 150.0
    assert not counter.has("g", 100.0)
    assert window_start(86_400 * 3 + 5, 86_400) == 86_400 * 3


def test_effective_limits_and_override_checks():
    settings = BaseServiceSettings(tenant_messages_per_minute=7, tenant_tokens_per_day=100)
    assert defaults(settings)["messages_per_minute"] == 7
    limits = effective({"messages_per_minute": 0, "connections": None}, settings)
    assert limits.messages_per_minute == 0 and limits.tokens_per_day == 100 and limits.connections == 1000
    assert set(limits.as_dict()) == set(LIMIT_NAMES)
    for bad in ({"nope": 1}, {"connections": -1}, {"connections": True}, {"connections": 2**63}, {"connections": 1.5}):
        with pytest.raises(ValueError):
            check_overrides(bad)


def _tenant() -> str:
    suffix = uuid.uuid4().hex[:10]
    account = system.create_account(f"l{suffix}", f"l{suffix}@example.com", "not-a-real-hash")
    return system.create_tenant(f"limits-{suffix}", account["id"])["id"]


def test_controls_across_tenants_and_per_tenant_writes(configured_db):
    first, second = _tenant(), _tenant()
    manager = Scoped(IsolationContext(first)).tenant
    assert manager.set_limits({"connections": 2, "tokens_per_day": 0})["connections"] == 2
    manager.set_status("suspended")
    controls = tenant_controls([first, second, "ten_zz_missing", first])
    assert set(controls) == {first, second}
    assert controls[first].suspended and controls[first].overrides["connections"] == 2
    assert controls[first].overrides["tokens_per_day"] == 0 and controls[first].overrides["messages_per_minute"] is None
    assert not controls[second].suspended and tenant_controls([]) == {}
    with pytest.raises(ValueError):
        manager.set_status("deleted")
    with pytest.raises(ValueError):
        manager.set_limits({"connections": -5})
    missing = Scoped(IsolationContext("ten_zz_missing")).tenant
    for call in (lambda: missing.set_limits({}), lambda: missing.set_status("active")):
        with pytest.raises(NotFound):
            call()


def test_usage_counts_and_presence_per_process(configured_db):
    tenant_id = _tenant()
    tenant = Scoped(IsolationContext(tenant_id)).tenant
    since = utcnow() - timedelta(minutes=1)
    tenant.report_connections("rep_a", 3)
    tenant.report_connections("rep_b", 2)
    tenant.report_connections("rep_a", 1)  # replaced, not added
    usage = tenant.usage_since(since, utcnow() - timedelta(minutes=1))
    assert usage["connections"] == 3 and usage["tokens"] == 0 and usage["messages_in"] == 0
    assert tenant.usage_since(since, utcnow() + timedelta(minutes=1))["connections"] == 0  # stale reports
    with pytest.raises(NotFound):
        Scoped(IsolationContext("ten_zz_missing")).tenant.report_connections("rep_a", 1)


def _invoke(*args: str, url: str, app_role: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": url}
    if app_role:
        env["DATABASE_APP_ROLE"] = app_role
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_invoke_create_operator_and_tenant_limits(provisioned, configured_db):
    suffix = uuid.uuid4().hex[:8]
    account = system.create_account(f"op{suffix}", f"op{suffix}@example.com", "not-a-real-hash")
    tenant_id = system.create_tenant(f"t{suffix}", account["id"])["id"]
    app = {"url": provisioned.url, "app_role": provisioned.app_role}  # tenant-limits runs as the application

    made = _invoke("create-operator", "--username", f"op{suffix}", url=provisioned.admin_url)
    assert made.returncode == 0 and "is now an operator" in made.stdout, made.stderr
    missing = _invoke("create-operator", "--username", "no_such_user", url=provisioned.admin_url)
    assert missing.returncode == 1 and "no account named" in missing.stderr

    result = _invoke(
        "tenant-limits", "--tenant", tenant_id, "--messages-per-minute", "5", "--tokens-per-day", "0",
        **app,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert lines["messages_per_minute"].split()[1] == "5" and "override; default 1200" in lines["messages_per_minute"]
    assert lines["tokens_per_day"].split()[1] == "0"
    assert lines["connections"].split()[1] == "1000" and lines["connections"].endswith("(default)")
    reset = _invoke(
        "tenant-limits",
        "--tenant",
        tenant_id,
        "--messages-per-minute",
        "default",
        url=provisioned.url,
        app_role=provisioned.app_role,
    )
    assert "(default)" in next(line for line in reset.stdout.splitlines() if "messages_per_minute" in line)
    assert tenant_controls([tenant_id])[tenant_id].overrides["tokens_per_day"] == 0

    bad = _invoke(
        "tenant-limits",
        "--tenant",
        tenant_id,
        "--connections",
        "many",
        url=provisioned.url,
        app_role=provisioned.app_role,
    )
    assert bad.returncode == 2 and "must be a number or 'default'" in bad.stderr
    negative = _invoke(
        "tenant-limits",
        "--tenant",
        tenant_id,
        "--connections",
        "-1",
        url=provisioned.url,
        app_role=provisioned.app_role,
    )
    assert negative.returncode == 2
    unknown = _invoke("tenant-limits", "--tenant", "ten_zz_missing", **app)
    assert unknown.returncode == 1 and "no tenant" in unknown.stderr


def test_invoke_tenant_limits_and_cleanup_signal_the_repliers_with_redis(provisioned, configured_db):
    """With REDIS_URL the tasks publish a "tenant" change signal, as the operator API does, so running
    repliers apply the change (or close a deleted tenant's connections) at once."""
    url = require_redis()
    prefix = unique_prefix()
    suffix = uuid.uuid4().hex[:8]
    account = system.create_account(f"sg{suffix}", f"sg{suffix}@example.com", "not-a-real-hash")
    tenant_id = system.create_tenant(f"t{suffix}", account["id"])["id"]
    listener = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(signals_channel(prefix))
    env = {**os.environ, "DATABASE_URL": provisioned.url, "REDIS_URL": url, "REDIS_PREFIX": prefix}
    if provisioned.app_role:
        env["DATABASE_APP_ROLE"] = provisioned.app_role

    def invoke(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr

    def heard() -> list[dict]:
        events, deadline = [], time.monotonic() + 1.0
        while time.monotonic() < deadline:
            message = listener.get_message(timeout=0.1)
            if message is not None:
                events.append(json.loads(message["data"]))
        return events

    try:
        invoke("tenant-limits", "--tenant", tenant_id)  # only reads: nothing changed, nothing published
        assert heard() == []
        invoke("tenant-limits", "--tenant", tenant_id, "--connections", "3")
        assert heard() == [{"kind": "tenant", "tenant_id": tenant_id}]
        invoke("cleanup", "--tenant", tenant_id)
        assert heard() == [{"kind": "tenant", "tenant_id": tenant_id}]
    finally:
        listener.close()
