"""Refusals and narrow-context paths of the scoped managers that the cross-tenant probes do not reach."""

from __future__ import annotations

from datetime import timedelta

import pytest

from isolation import IsolationContext, IsolationViolationError, NotFound, Scoped, system
from isolation.cleanup import delete_tenant
from isolation.ids import utcnow
from isolation.managers import MAX_PAGE, AgentManager, MessageManager
from tests.isolation.conftest import make_tenant


@pytest.fixture
def tenant(db):
    tenant_id, agent_ids, account_id = make_tenant(2)
    return tenant_id, agent_ids, account_id


def _stream(tenant_id: str, agent_id: str, group_id: str) -> IsolationContext:
    row = Scoped(IsolationContext(tenant_id, agent_id, "qq")).chat_streams.get_or_create(group_id=group_id)
    return IsolationContext(tenant_id, agent_id, "qq", row["id"])


def test_scoped_builds_each_manager_once_and_knows_no_others():
    scoped = Scoped(IsolationContext("ten_abc"))
    assert scoped.agents is scoped.agents and isinstance(scoped.agents, AgentManager)
    assert scoped.messages.ctx is scoped.ctx
    with pytest.raises(AttributeError, match="agent"):
        scoped.agent  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize("not_a_context", ["ten_abc", None, {"tenant_id": "ten_abc"}])
def test_managers_refuse_anything_but_an_isolation_context(not_a_context):
    with pytest.raises(IsolationViolationError):
        Scoped(not_a_context)
    with pytest.raises(IsolationViolationError):
        AgentManager(not_a_context)
    with pytest.raises(IsolationViolationError):
        MessageManager(not_a_context)


def test_page_sizes_below_one_are_refused_and_large_ones_capped(tenant):
    tenant_id, _agents, _account = tenant
    scoped = Scoped(IsolationContext(tenant_id))
    with pytest.raises(ValueError, match="limit"):
        scoped.agents.list(limit=0)
    with pytest.raises(ValueError, match="limit"):
        scoped.memberships.list(limit=-1)
    assert len(scoped.agents.list(limit=MAX_PAGE * 10)) == 2


def test_tenant_update_changes_the_type_and_a_deleted_tenant_is_not_found(tenant):
    tenant_id, _agents, _account = tenant
    scoped = Scoped(IsolationContext(tenant_id))
    updated = scoped.tenant.update(type="enterprise")
    assert updated["type"] == "enterprise" and scoped.tenant.get()["type"] == "enterprise"
    delete_tenant(tenant_id)
    with pytest.raises(NotFound):
        scoped.tenant.update(name="ghost")
    with pytest.raises(NotFound):
        Scoped(IsolationContext("ten_never_existed")).tenant.update(type="personal")


def test_membership_roles_outside_the_list_are_refused(tenant):
    tenant_id, _agents, owner = tenant
    other = system.create_account(f"m_{tenant_id[-8:]}", f"m_{tenant_id[-8:]}@example.test", "hash")
    memberships = Scoped(IsolationContext(tenant_id)).memberships
    with pytest.raises(ValueError, match="role"):
        memberships.add(other["id"], "superuser")
    with pytest.raises(NotFound):
        memberships.get(other["id"])
    with pytest.raises(ValueError, match="role"):
        memberships.set_role(owner, "god")
    assert memberships.get(owner)["role"] == "owner"


def test_an_agent_context_cannot_create_keys_for_a_sibling_agent(tenant):
    tenant_id, (agent_1, agent_2), _account = tenant
    with pytest.raises(NotFound):
        Scoped(IsolationContext(tenant_id, agent_1)).api_keys.create(agent_2, name="sibling")
    assert Scoped(IsolationContext(tenant_id)).api_keys.count() == 0
    row, secret = Scoped(IsolationContext(tenant_id, agent_1)).api_keys.create(agent_1, name="own")
    assert row["agent_id"] == agent_1 and secret.startswith("mtk_")


def test_key_statuses_of_no_ids_is_empty_without_a_query(tenant):
    tenant_id, (agent_1, _agent_2), _account = tenant
    keys = Scoped(IsolationContext(tenant_id)).api_keys
    row, _secret = keys.create(agent_1, name="k")
    assert keys.statuses([]) == {}
    assert set(keys.statuses([row["id"], "key_unknown"])) == {row["id"]}


def test_a_chat_context_sees_only_its_own_stream(tenant):
    tenant_id, (agent_1, _agent_2), _account = tenant
    first, second = _stream(tenant_id, agent_1, "g1"), _stream(tenant_id, agent_1, "g2")
    streams = Scoped(first).chat_streams
    assert [s["id"] for s in streams.list()] == [first.chat_stream_id]
    assert streams.count() == 1
    with pytest.raises(NotFound):
        streams.get(second.chat_stream_id)
    assert Scoped(IsolationContext(tenant_id, agent_1, "qq")).chat_streams.count() == 2


def test_a_stream_needs_a_group_or_a_user(tenant):
    tenant_id, (agent_1, _agent_2), _account = tenant
    streams = Scoped(IsolationContext(tenant_id, agent_1, "qq")).chat_streams
    for empty in ({}, {"group_id": "", "user_id": ""}, {"group_name": "named only"}):
        with pytest.raises(ValueError, match="group_id or a user_id"):
            streams.get_or_create(**empty)
    assert streams.count() == 0


def test_message_direction_is_checked_and_history_pages_back_in_time(tenant):
    tenant_id, (agent_1, _agent_2), _account = tenant
    messages = Scoped(_stream(tenant_id, agent_1, "g1")).messages
    with pytest.raises(ValueError, match="direction"):
        messages.add(message_id="bad", direction="both", text="t", segments=[])
    start = utcnow() - timedelta(hours=1)
    for i in range(5):
        messages.add(
            message_id=f"m{i}", direction="in", text=f"t{i}", segments=[], created_at=start + timedelta(minutes=i)
        )
    assert [m["message_id"] for m in messages.history(limit=10)] == ["m0", "m1", "m2", "m3", "m4"]
    before = start + timedelta(minutes=3)
    assert [m["message_id"] for m in messages.history(limit=2, before=before)] == ["m1", "m2"]
    assert messages.history(limit=10, before=start) == []


def test_memory_levels_outside_the_list_are_refused(tenant):
    tenant_id, (agent_1, _agent_2), _account = tenant
    memories = Scoped(_stream(tenant_id, agent_1, "g1")).memories
    with pytest.raises(ValueError, match="level"):
        memories.add("x", level="galaxy")
    assert memories.count() == 0
    assert memories.add("chat by default")["level"] == "chat"
