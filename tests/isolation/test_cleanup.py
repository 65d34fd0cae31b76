"""Cleanup removes exactly one tenant's (or one agent's, or one run's) rows, and counts them."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from isolation import IsolationContext, NotFound, Scoped, system
from isolation.cleanup import (
    accounts_with_prefix,
    check_prefix,
    delete_agent_history,
    delete_by_prefix,
    delete_tenant,
    plan_prefix_cleanup,
)
from isolation.models import TENANT_TABLES
from tests.isolation.conftest import make_tenant
from testsupport.databases import table_counts, tenant_row_counts


def _populate(tenant_id: str, agent_ids: list[str], messages: int = 3) -> None:
    for agent_id in agent_ids:
        scoped = Scoped(IsolationContext(tenant_id))
        scoped.api_keys.create(agent_id, name="key")
        Scoped(IsolationContext(tenant_id, agent_id)).memories.add("agent-wide", level="agent")
        for platform in ("qq", "web"):
            ctx = IsolationContext(tenant_id, agent_id, platform)
            stream = Scoped(ctx).chat_streams.get_or_create(group_id="g1")
            chat = ctx.child(chat_stream_id=stream["id"])
            for i in range(messages):
                Scoped(chat).messages.add(message_id=f"m{i}", direction="in", text=f"hello {i}", segments=[])
            Scoped(chat).memories.add("chat memory", level="chat")
            Scoped(chat).llm_usage.record(provider="offline", model="offline", outcome="offline")


def test_delete_tenant_leaves_zero_rows_and_others_untouched(db, provisioned):
    victim, victim_agents, _ = make_tenant(2)
    bystander, bystander_agents, _ = make_tenant(2)
    _populate(victim, victim_agents)
    _populate(bystander, bystander_agents)
    before = table_counts(provisioned)
    expected = {table: before[table].get(victim, 0) for table in before}
    assert all(expected[t] > 0 for t in ("agents", "messages", "memories", "llm_usage", "api_keys", "chat_streams"))

    counts = delete_tenant(victim)

    assert counts == expected
    assert set(tenant_row_counts(provisioned, victim).values()) == {0}
    after = table_counts(provisioned)
    for table in before:
        others_before = {t: n for t, n in before[table].items() if t != victim}
        assert after[table] == others_before, table
    with pytest.raises(NotFound):
        Scoped(IsolationContext(victim)).tenant.get()


def test_delete_agent_history_keeps_the_agent_and_its_keys(db, provisioned):
    tenant, agents, _ = make_tenant(2)
    _populate(tenant, agents)
    keep_before = tenant_row_counts(provisioned, tenant)
    counts = delete_agent_history(IsolationContext(tenant), agents[0])
    assert counts == {"llm_usage": 2, "memories": 3, "messages": 6, "chat_streams": 2}
    after = tenant_row_counts(provisioned, tenant)
    assert after["agents"] == keep_before["agents"] == 2
    assert after["api_keys"] == keep_before["api_keys"]
    assert after["messages"] == keep_before["messages"] - 6
    # the other agent's history is intact
    other = IsolationContext(tenant, agents[1])
    assert Scoped(other).chat_streams.count() == 2


def test_delete_agent_also_removes_everything_below_it(db, provisioned):
    tenant, agents, _ = make_tenant(2)
    _populate(tenant, agents)
    counts = Scoped(IsolationContext(tenant)).agents.delete(agents[0])
    assert counts == {
        "llm_usage": 2,
        "memories": 3,
        "messages": 6,
        "chat_streams": 2,
        "api_keys": 1,
        "agents": 1,
    }
    assert Scoped(IsolationContext(tenant)).agents.count() == 1


RUN = "it_20260102030405_abcdef_"  # a run prefix as integration_tests/runner.py makes them


def _run_prefix() -> str:
    """A fresh run prefix: the session database outlives each test."""
    return f"it_20260102030405_{secrets.token_hex(3)}_"


def test_delete_by_prefix_removes_the_runs_accounts_and_the_tenants_only_they_belong_to(db, provisioned):
    run = _run_prefix()
    run_tenants = []
    for i in range(2):
        account = system.create_account(f"{run}u{i}", f"{run}u{i}@example.test", "h")
        tenant = system.create_tenant(f"workspace {i}", account["id"])
        agent = Scoped(IsolationContext(tenant["id"])).agents.create(name="a", persona={}, config={}, llm={})
        _populate(tenant["id"], [agent["id"]], messages=2)
        run_tenants.append(tenant["id"])
    # A real customer whose tenant is named like the run: names are the customer's choice, never matched.
    customer, customer_agents, customer_account = make_tenant(1, name=f"{run}my real company")
    _populate(customer, customer_agents)
    # A run account invited into another customer's tenant: only its membership goes.
    bystander, bystander_agents, _ = make_tenant(1)
    _populate(bystander, bystander_agents)
    invited = system.create_account(f"{run}guest", f"{run}guest@example.test", "h")
    Scoped(IsolationContext(bystander)).memberships.add(invited["id"], "member")
    before = table_counts(provisioned)

    plan = plan_prefix_cleanup(run)
    assert sorted(plan.tenants) == sorted(run_tenants) and plan.memberships == [(invited["id"], bystander)]
    assert plan.kept == {}
    counts = delete_by_prefix(run)

    assert counts["tenants"] == 2
    assert counts["accounts"] == 3
    assert counts["memberships"] == 3  # two owners + the guest's membership in the bystander
    for tenant_id in run_tenants:
        assert set(tenant_row_counts(provisioned, tenant_id).values()) == {0}
    after = table_counts(provisioned)
    for table in TENANT_TABLES:
        expected = before[table].get(bystander, 0) - (1 if table == "memberships" else 0)
        assert after[table].get(bystander, 0) == expected, table
        assert after[table].get(customer, 0) == before[table].get(customer, 0), table
    assert Scoped(IsolationContext(bystander)).agents.count() == 1
    # The customer keeps the tenant named like the run, with everything in it, and still belongs to it.
    assert Scoped(IsolationContext(customer)).tenant.get()["name"] == f"{run}my real company"
    assert system.account_memberships(customer_account) == [{"tenant_id": customer, "role": "owner"}]
    assert accounts_with_prefix(run) == []


def test_a_run_account_that_alone_owns_a_tenant_with_other_members_is_kept(db, provisioned):
    """Deleting it would leave a customer in a tenant without an owner: it stays, and is reported."""
    run = _run_prefix()
    owner = system.create_account(f"{run}owner", f"{run}owner@example.test", "h")
    shared = system.create_tenant("shared workspace", owner["id"])["id"]
    own = system.create_tenant("its own workspace", owner["id"])["id"]
    customer = system.create_account("customer_in_shared", "customer-shared@example.test", "h")
    Scoped(IsolationContext(shared)).memberships.add(customer["id"], "member")
    # A second run account in the shared tenant and co-owner of a customer's tenant with another owner.
    helper = system.create_account(f"{run}helper", f"{run}helper@example.test", "h")
    Scoped(IsolationContext(shared)).memberships.add(helper["id"], "admin")
    co_owned, _agents, co_owner = make_tenant(1)
    Scoped(IsolationContext(co_owned)).memberships.add(helper["id"], "owner")
    before = table_counts(provisioned)

    plan = plan_prefix_cleanup(run)
    assert plan.kept == {owner["id"]: [shared]} and plan.tenants == []
    counts = delete_by_prefix(run)

    assert counts["accounts"] == 1 and counts["tenants"] == 0 and counts["memberships"] == 2
    assert accounts_with_prefix(run) == [{"id": owner["id"], "username": owner["username"]}]
    after = table_counts(provisioned)
    assert after["memberships"][shared] == before["memberships"][shared] - 1  # the helper left
    assert after["memberships"][own] == before["memberships"][own] == 1  # the kept account's tenants stay
    assert after["memberships"][co_owned] == before["memberships"][co_owned] - 1
    assert system.account_memberships(co_owner) == [{"tenant_id": co_owned, "role": "owner"}]
    assert Scoped(IsolationContext(co_owned)).agents.count() == 1


@pytest.mark.parametrize(
    ("prefix", "force", "message"),
    [
        ("", False, "empty cleanup prefix"),
        ("", True, "empty cleanup prefix"),
        ("it", True, "at least 3 characters"),
        ("it_", False, "shorter than a run id .*pass --force"),
        (RUN[:-2], False, "shorter than a run id"),
    ],
)
def test_empty_and_short_prefixes_are_refused(db, prefix, force, message):
    with pytest.raises(ValueError, match=message):
        delete_by_prefix(prefix, force=force)
    with pytest.raises(ValueError, match=message):
        check_prefix(prefix, force=force)


def test_a_whole_run_id_or_force_is_accepted_and_nothing_else_matches_an_empty_prefix(db):
    assert check_prefix(RUN) == RUN and check_prefix(RUN[:-1]) == RUN[:-1]
    assert check_prefix("it_", force=True) == "it_"
    with pytest.raises(ValueError, match="empty cleanup prefix"):
        accounts_with_prefix("")


def test_delete_account_takes_its_sole_tenants_and_leaves_shared_ones(db, provisioned):
    from isolation.cleanup import delete_account

    tenant, agents, owner = make_tenant(1)
    _populate(tenant, agents, messages=1)
    bystander, _, _ = make_tenant(1)
    Scoped(IsolationContext(bystander)).memberships.add(owner, "member")
    bystander_before = tenant_row_counts(provisioned, bystander)

    counts = delete_account(owner)

    assert counts["accounts"] == 1 and counts["tenants"] == 1
    assert set(tenant_row_counts(provisioned, tenant).values()) == {0}
    after = tenant_row_counts(provisioned, bystander)
    assert after["memberships"] == bystander_before["memberships"] - 1
    assert {k: v for k, v in after.items() if k != "memberships"} == {
        k: v for k, v in bystander_before.items() if k != "memberships"
    }
    with pytest.raises(NotFound):
        system.get_account(owner)
    with pytest.raises(NotFound):
        delete_account(owner)


def test_delete_account_refuses_while_it_is_the_only_owner_of_a_shared_tenant(db, provisioned):
    from isolation import Conflict
    from isolation.cleanup import delete_account

    tenant, _agents, owner = make_tenant(1)
    guest = system.create_account("guest_of_shared", "guest_shared@example.test", "h")
    Scoped(IsolationContext(tenant)).memberships.add(guest["id"], "member")
    before = table_counts(provisioned)
    with pytest.raises(Conflict, match="only owner"):
        delete_account(owner)
    assert table_counts(provisioned) == before
    Scoped(IsolationContext(tenant)).memberships.set_role(guest["id"], "owner")
    assert delete_account(owner)["memberships"] == 1  # another owner remains: the tenant stays
    assert Scoped(IsolationContext(tenant)).agents.count() == 1


# -- `invoke cleanup` --------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "invoke", "cleanup", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefix", ""], "error: an empty cleanup prefix would match every account: refused"),
        (["--prefix", "", "--force"], "error: an empty cleanup prefix would match every account: refused"),
        (["--prefix", "it_"], "error: prefix 'it_' is shorter than a run id (24 characters"),
        (["--prefix", "it", "--force"], "error: a cleanup prefix needs at least 3 characters"),
    ],
)
def test_invoke_cleanup_refuses_empty_and_short_prefixes(tmp_path, args, message):
    database = tmp_path / "untouched.db"
    result = _invoke(*args, "--database-url", f"sqlite:///{database}")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not database.exists()  # refused before the database was opened


def test_invoke_cleanup_takes_the_runs_accounts_and_never_a_customers_tenant(db, provisioned):
    run = _run_prefix()
    run_account = system.create_account(f"{run}u0", f"{run}u0@example.test", "h")
    run_tenant = system.create_tenant("run workspace", run_account["id"])["id"]
    customer, _agents, customer_account = make_tenant(1, name=f"{run}my real company")
    owner = system.create_account(f"{run}owner", f"{run}owner@example.test", "h")
    shared = system.create_tenant("shared workspace", owner["id"])["id"]
    Scoped(IsolationContext(shared)).memberships.add(customer_account, "member")
    before = table_counts(provisioned)
    env = {**os.environ, "DATABASE_APP_ROLE": provisioned.app_role or "maitenant_app"}

    result = _invoke("--prefix", run, "--database-url", provisioned.url, env=env)

    assert result.returncode == 1, result.stdout + result.stderr  # one account had to be kept
    assert f"accounts left (the only owners of tenants with other members): ['{run}owner']" in result.stderr
    assert "accounts" in result.stdout and "total" in result.stdout
    after = table_counts(provisioned)
    assert set(tenant_row_counts(provisioned, run_tenant).values()) == {0}
    for tenant_id in (customer, shared):
        assert {t: after[t].get(tenant_id, 0) for t in after} == {t: before[t].get(tenant_id, 0) for t in before}
    assert accounts_with_prefix(run) == [{"id": owner["id"], "username": owner["username"]}]
