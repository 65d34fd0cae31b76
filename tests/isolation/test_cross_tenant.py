"""Every manager method, called with tenant B's context on tenant A's ids, raises NotFound.

The table of calls below must name every public method of every manager that takes an id: a
meta-test fails when a new method is added without being probed here.
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import orjson
import pytest

from isolation import IsolationContext, NotFound, Scoped
from isolation.cleanup import delete_agent_history
from isolation.ids import utcnow
from isolation.managers import TableManager
from tests.isolation.conftest import make_tenant
from testsupport.databases import table_counts


@pytest.fixture
def a_and_b(db):
    """Tenant A with one of everything; tenant B with an agent of its own."""
    tenant_a, agents_a, account_a = make_tenant(1)
    tenant_b, agents_b, account_b = make_tenant(1)
    ctx_a = IsolationContext(tenant_a)
    scoped_a = Scoped(ctx_a)
    key, _secret = scoped_a.api_keys.create(agents_a[0], name="k")
    chat_a = ctx_a.child(agent_id=agents_a[0], platform="qq")
    stream = Scoped(chat_a).chat_streams.get_or_create(group_id="42")
    full_a = chat_a.child(chat_stream_id=stream["id"])
    message, _ = Scoped(full_a).messages.add(message_id="m1", direction="in", text="hi", segments=[])
    memory = Scoped(full_a).memories.add("secret of A", level="chat")
    usage = Scoped(full_a).llm_usage.record(provider="offline", model="offline", outcome="offline")
    scoped_a.refresh_tokens.issue("jti_a", account_a, utcnow() + timedelta(days=1), session_id="sid_a")
    ids = {
        "tenant": tenant_a,
        "agent": agents_a[0],
        "account": account_a,
        "key": key["id"],
        "stream": stream["id"],
        "message": message["id"],
        "message_id": "m1",
        "memory": memory["id"],
        "usage": usage["id"],
        "jti": "jti_a",
        "sid": "sid_a",
    }
    return ids, tenant_b, agents_b[0], account_b


# (manager, method) -> how to call it with B's scoped object and A's ids. Each must raise NotFound.
CALLS = {
    ("memberships", "get"): lambda s, a: s.memberships.get(a["account"]),
    ("memberships", "get_with_session"): lambda s, a: s.memberships.get_with_session(a["account"], a["sid"]),
    ("memberships", "get_with_session_and_agent_page"): lambda s, a: s.memberships.get_with_session_and_agent_page(
        a["account"], a["sid"]
    ),
    ("memberships", "delete"): lambda s, a: s.memberships.delete(a["account"]),
    ("memberships", "set_role"): lambda s, a: s.memberships.set_role(a["account"], "member"),
    ("refresh_tokens", "get"): lambda s, a: s.refresh_tokens.get(a["jti"]),
    ("refresh_tokens", "delete"): lambda s, a: s.refresh_tokens.delete(a["jti"]),
    ("refresh_tokens", "revoke"): lambda s, a: s.refresh_tokens.revoke(a["jti"]),
    ("refresh_tokens", "rotate"): lambda s, a: s.refresh_tokens.rotate(
        a["jti"], a["account"], "jti_new", utcnow() + timedelta(days=1)
    ),
    ("refresh_tokens", "issue"): lambda s, a: s.refresh_tokens.issue("jti_x", a["account"], utcnow()),
    ("agents", "get"): lambda s, a: s.agents.get(a["agent"]),
    ("agents", "update"): lambda s, a: s.agents.update(a["agent"], name="stolen"),
    ("agents", "delete"): lambda s, a: s.agents.delete(a["agent"]),
    ("agents", "encrypted_api_key"): lambda s, a: s.agents.encrypted_api_key(a["agent"]),
    ("agents", "version"): lambda s, a: s.agents.version(a["agent"]),
    ("api_keys", "get"): lambda s, a: s.api_keys.get(a["key"]),
    ("api_keys", "delete"): lambda s, a: s.api_keys.delete(a["key"]),
    ("api_keys", "revoke"): lambda s, a: s.api_keys.revoke(a["key"]),
    ("api_keys", "create"): lambda s, a: s.api_keys.create(a["agent"], name="stolen"),
    ("chat_streams", "get"): lambda s, a: s.chat_streams.get(a["stream"]),
    ("chat_streams", "delete"): lambda s, a: s.chat_streams.delete(a["stream"]),
    ("chat_streams", "context_for"): lambda s, a: s.chat_streams.context_for(a["stream"]),
    ("messages", "get"): lambda s, a: s.messages.get(a["message"]),
    ("messages", "delete"): lambda s, a: s.messages.delete(a["message"]),
    ("memories", "get"): lambda s, a: s.memories.get(a["memory"]),
    ("memories", "delete"): lambda s, a: s.memories.delete(a["memory"]),
    ("memories", "update"): lambda s, a: s.memories.update(a["memory"], "overwritten"),
    ("llm_usage", "get"): lambda s, a: s.llm_usage.get(a["usage"]),
    ("llm_usage", "delete"): lambda s, a: s.llm_usage.delete(a["usage"]),
}

# Methods with ids that answer "nothing" instead of raising: B must get an empty/false/zero answer.
QUIET = {
    ("refresh_tokens", "is_active"): (lambda s, a: s.refresh_tokens.is_active(a["jti"], a["account"]), False),
    ("refresh_tokens", "revoke_all"): (lambda s, a: s.refresh_tokens.revoke_all(a["account"]), 0),
    ("refresh_tokens", "revoke_session"): (lambda s, a: s.refresh_tokens.revoke_session(a["sid"]), 0),
    ("api_keys", "statuses"): (lambda s, a: s.api_keys.statuses([a["key"]]), {}),
    ("api_keys", "record_use"): (lambda s, a: s.api_keys.record_use(a["key"]), None),
    ("api_keys", "list"): (lambda s, a: s.api_keys.list(agent_id=a["agent"]), []),
    ("chat_streams", "touch"): (lambda s, a: s.chat_streams.touch(a["stream"]), None),
}

# Methods that take no id of another row (they create in or read the caller's own context);
# they are exercised against the in-memory model by the property-based test.
NO_ID = {
    "add",
    "list",
    "list_with_key_flags",
    "page_json",
    "page",
    "count",
    "create",
    "history",
    "get_or_create",
    "stream_id_for",
    "by_message_id",
    "relevant",
    "record",
    "delete_all",
}


def _public_methods(manager: TableManager) -> set[str]:
    return {name for name, _ in inspect.getmembers(type(manager), inspect.isfunction) if not name.startswith("_")}


def test_every_manager_method_is_probed(db):
    scoped = Scoped(IsolationContext("ten_probe"))
    for attribute in (
        "memberships",
        "refresh_tokens",
        "agents",
        "api_keys",
        "chat_streams",
        "messages",
        "memories",
        "llm_usage",
    ):
        for method in _public_methods(getattr(scoped, attribute)):
            key = (attribute, method)
            assert key in CALLS or key in QUIET or method in NO_ID, f"{key} is not probed across tenants"


@pytest.mark.parametrize("call", sorted(CALLS), ids=lambda c: ".".join(c))
def test_foreign_ids_raise_not_found_and_change_nothing(a_and_b, provisioned, call):
    ids_a, tenant_b, _agent_b, _account_b = a_and_b
    before = table_counts(provisioned)
    snapshot = Scoped(IsolationContext(ids_a["tenant"])).agents.get(ids_a["agent"])
    with pytest.raises(NotFound):
        CALLS[call](Scoped(IsolationContext(tenant_b)), ids_a)
    assert table_counts(provisioned) == before
    assert Scoped(IsolationContext(ids_a["tenant"])).agents.get(ids_a["agent"]) == snapshot


@pytest.mark.parametrize("call", sorted(QUIET), ids=lambda c: ".".join(c))
def test_foreign_ids_in_quiet_methods_see_and_change_nothing(a_and_b, call):
    ids_a, tenant_b, _agent_b, _account_b = a_and_b
    key_before = Scoped(IsolationContext(ids_a["tenant"])).api_keys.get(ids_a["key"])
    stream_before = Scoped(IsolationContext(ids_a["tenant"])).chat_streams.get(ids_a["stream"])
    fn, expected = QUIET[call]
    assert fn(Scoped(IsolationContext(tenant_b)), ids_a) == expected
    assert Scoped(IsolationContext(ids_a["tenant"])).api_keys.get(ids_a["key"]) == key_before
    assert Scoped(IsolationContext(ids_a["tenant"])).chat_streams.get(ids_a["stream"]) == stream_before
    assert Scoped(IsolationContext(ids_a["tenant"])).refresh_tokens.is_active(ids_a["jti"], ids_a["account"])


def test_forged_contexts_mixing_b_with_a_ids_find_and_create_nothing(a_and_b, provisioned):
    """B's tenant id combined with A's agent/stream ids must not reach A's rows."""
    ids_a, tenant_b, _agent_b, _account_b = a_and_b
    before = table_counts(provisioned)
    forged_agent = IsolationContext(tenant_b, ids_a["agent"], "qq")
    forged_chat = forged_agent.child(chat_stream_id=ids_a["stream"])
    assert Scoped(forged_chat).messages.history(50) == []
    assert Scoped(forged_chat).messages.page(50) == []
    assert Scoped(forged_chat).memories.relevant() == []
    with pytest.raises(NotFound):
        Scoped(forged_chat).messages.by_message_id(ids_a["message_id"])
    with pytest.raises(NotFound):
        Scoped(forged_agent).chat_streams.get_or_create(group_id="42")
    with pytest.raises(NotFound):
        Scoped(forged_chat).messages.add(message_id="x", direction="in", text="x", segments=[])
    with pytest.raises(NotFound):
        Scoped(forged_chat).memories.add("x", level="chat")
    with pytest.raises(NotFound):
        Scoped(forged_chat).llm_usage.record(provider="offline", model="m", outcome="ok")
    with pytest.raises(NotFound):
        delete_agent_history(IsolationContext(tenant_b), ids_a["agent"])
    assert table_counts(provisioned) == before


def test_lists_and_counts_of_b_never_include_a(a_and_b):
    ids_a, tenant_b, agent_b, _account_b = a_and_b
    scoped_b = Scoped(IsolationContext(tenant_b))
    everything_b = (
        scoped_b.agents.list()
        + scoped_b.agents.list_with_key_flags()
        + scoped_b.api_keys.list()
        + scoped_b.chat_streams.list()
        + scoped_b.memories.list()
        + scoped_b.llm_usage.list()
        + scoped_b.memberships.list()
    )
    assert all(row["tenant_id"] == tenant_b for row in everything_b)
    seen_ids = {row.get("id") for row in everything_b} | {row.get("account_id") for row in everything_b}
    assert not seen_ids & {
        ids_a["agent"],
        ids_a["key"],
        ids_a["stream"],
        ids_a["memory"],
        ids_a["usage"],
        ids_a["account"],
    }
    assert [a["id"] for a in scoped_b.agents.list()] == [agent_b]
    page_b, more = scoped_b.agents.page_json()
    assert [a["id"] for a in orjson.loads(page_b)] == [agent_b] and more is False
    assert ids_a["agent"] not in page_b
    # A context naming A's agent under B's tenant (a forged context) sees nothing of it.
    forged = Scoped(IsolationContext(tenant_b, agent_id=ids_a["agent"]))
    assert forged.agents.page_json() == ("[]", False)
    assert forged.agents.list_with_key_flags() == []
    assert scoped_b.tenant.stats()["messages"] == 0
    assert scoped_b.tenant.get()["id"] == tenant_b
