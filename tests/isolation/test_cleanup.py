"""Cleanup removes exactly one tenant's (or one agent's, or one run's) rows, and counts them."""

from __future__ import annotations

import pytest

from isolation import IsolationContext, NotFound, Scoped, system
from isolation.cleanup import delete_agent_history, delete_by_prefix, delete_tenant, tenants_with_prefix
from isolation.models import TENANT_TABLES
from isolation.testing import table_counts, tenant_row_counts
from tests.isolation.conftest import make_tenant


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


def test_delete_by_prefix_removes_the_runs_tenants_and_accounts_only(db, provisioned):
    run_tenants = []
    for i in range(2):
        account = system.create_account(f"itrun_x9_user{i}", f"itrun{i}@example.test", "h")
        tenant = system.create_tenant(f"itrun_x9_tenant{i}", account["id"])
        agent = Scoped(IsolationContext(tenant["id"])).agents.create(name="a", persona={}, config={}, llm={})
        _populate(tenant["id"], [agent["id"]], messages=2)
        run_tenants.append(tenant["id"])
    bystander, bystander_agents, _ = make_tenant(1, name="itrun_y_bystander_lookalike")
    _populate(bystander, bystander_agents)
    # a run account that was invited into the bystander tenant: only the membership goes
    invited = system.create_account("itrun_x9_guest", "guest@example.test", "h")
    Scoped(IsolationContext(bystander)).memberships.add(invited["id"], "member")
    before = table_counts(provisioned)

    assert sorted(tenants_with_prefix("itrun_x9_")) == sorted(run_tenants)
    counts = delete_by_prefix("itrun_x9_")

    assert counts["tenants"] == 2
    assert counts["accounts"] == 3
    assert counts["memberships"] == 3  # two owners + the guest's membership in the bystander
    for tenant_id in run_tenants:
        assert set(tenant_row_counts(provisioned, tenant_id).values()) == {0}
    after = table_counts(provisioned)
    for table in TENANT_TABLES:
        expected = before[table].get(bystander, 0) - (1 if table == "memberships" else 0)
        assert after[table].get(bystander, 0) == expected, table
    assert Scoped(IsolationContext(bystander)).agents.count() == 1


def test_short_prefixes_are_refused(db):
    with pytest.raises(ValueError, match="at least 3"):
        delete_by_prefix("a")


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
