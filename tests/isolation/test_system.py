"""The narrow cross-tenant lookups: API keys by hash, memberships by account, accounts, templates."""

from __future__ import annotations

from datetime import timedelta

import pytest

from isolation import Conflict, InvalidValueError, IsolationContext, NotFound, Scoped, system
from isolation.ids import chat_stream_id, hash_api_key, utcnow
from tests.isolation.conftest import make_tenant


def test_api_key_lookup_by_secret_and_refusals(db):
    tenant, agents, _ = make_tenant(1)
    scoped = Scoped(IsolationContext(tenant))
    key, secret = scoped.api_keys.create(agents[0], name="k", expires_at=utcnow() + timedelta(days=1))
    principal = system.lookup_api_key(secret)
    assert (principal.tenant_id, principal.agent_id, principal.key_id) == (tenant, agents[0], key["id"])
    assert principal.refusal() is None
    assert principal.context == IsolationContext(tenant, agents[0])
    assert principal.refusal(now=utcnow() + timedelta(days=2)) == "api key expired"
    scoped.api_keys.revoke(key["id"])
    assert system.lookup_api_key(secret).refusal() == "api key revoked"
    assert system.lookup_api_key(secret + "x") is None
    assert system.lookup_api_key("") is None
    assert system.lookup_api_key("x" * 1000) is None


def test_only_hashes_and_prefixes_are_stored(db):
    tenant, agents, _ = make_tenant(1)
    key, secret = Scoped(IsolationContext(tenant)).api_keys.create(agents[0], name="k")
    assert secret.startswith("mtk_") and len(secret) > 40
    assert secret not in str(key)
    assert "key_hash" not in key
    assert key["prefix"] == secret[:10]
    assert hash_api_key(secret) != secret


def test_duplicate_account_and_agent_names_conflict(db):
    account = system.create_account("dup_user_1", "dup1@example.test", "h")
    with pytest.raises(Conflict):
        system.create_account("dup_user_1", "other@example.test", "h")
    with pytest.raises(Conflict):
        system.create_account("dup_user_2", "dup1@example.test", "h")
    tenant = system.create_tenant("t", account["id"])
    scoped = Scoped(IsolationContext(tenant["id"]))
    scoped.agents.create(name="same", persona={}, config={}, llm={})
    with pytest.raises(Conflict):
        scoped.agents.create(name="same", persona={}, config={}, llm={})
    with pytest.raises(Conflict):
        scoped.memberships.add(account["id"], "member")


def test_account_login_lookup_hides_the_hash_from_get(db):
    account = system.create_account("login_user", "login@example.test", "the-hash")
    assert "password_hash" not in system.get_account(account["id"])
    found, password_hash = system.find_account_for_login("login@example.test")
    assert (found["id"], password_hash) == (account["id"], "the-hash")
    assert system.find_account_for_login("nobody") is None
    system.set_password_hash(account["id"], "new-hash")
    assert system.find_account_for_login("login_user")[1] == "new-hash"
    with pytest.raises(NotFound):
        system.get_account("acc_missing")


def test_memberships_of_an_account_across_tenants(db):
    tenant_a, _, owner = make_tenant(0)
    tenant_b, _, _ = make_tenant(0)
    Scoped(IsolationContext(tenant_b)).memberships.add(owner, "member")
    assert system.account_memberships(owner) == [
        {"tenant_id": tenant_a, "role": "owner"},
        {"tenant_id": tenant_b, "role": "member"},
    ]


def test_templates_catalogue(db):
    templates = system.list_templates()
    assert len(templates) == 5
    template = system.get_template("caring_friend")
    assert template["persona"]["personality"]
    assert template["config"]["chat"]["max_context_size"] == 40
    with pytest.raises(NotFound):
        system.get_template("nope")


def test_chat_stream_ids_include_every_part_of_the_context():
    base = chat_stream_id("ten_a", "agt_a", "qq", "group", "42")
    assert base != chat_stream_id("ten_b", "agt_a", "qq", "group", "42")
    assert base != chat_stream_id("ten_a", "agt_b", "qq", "group", "42")
    assert base != chat_stream_id("ten_a", "agt_a", "web", "group", "42")
    assert base != chat_stream_id("ten_a", "agt_a", "qq", "private", "42")
    assert base == chat_stream_id("ten_a", "agt_a", "qq", "group", "42")


def test_refresh_token_rotation_and_reuse_detection(db):
    tenant, _, account = make_tenant(0)
    tokens = Scoped(IsolationContext(tenant)).refresh_tokens
    later = utcnow() + timedelta(days=1)
    tokens.issue("r1", account, later)
    assert tokens.is_active("r1", account)
    tokens.rotate("r1", account, "r2", later)
    assert not tokens.is_active("r1", account)
    assert tokens.is_active("r2", account)
    with pytest.raises(NotFound):  # replaying the rotated token fails and revokes the family
        tokens.rotate("r1", account, "r3", later)
    assert not tokens.is_active("r2", account)
    tokens.issue("r4", account, utcnow() - timedelta(seconds=1))
    assert not tokens.is_active("r4", account)
    with pytest.raises(NotFound):
        tokens.rotate("r4", account, "r5", later)


def test_agent_update_bumps_version_and_hides_the_secret(db):
    tenant, agents, _ = make_tenant(1)
    agents_mgr = Scoped(IsolationContext(tenant)).agents
    assert agents_mgr.version(agents[0]) == 1
    updated = agents_mgr.update(agents[0], description="new", encrypted_api_key="encrypted-blob")
    assert updated["version"] == 2 and updated["description"] == "new"
    assert "encrypted_api_key" not in updated and "llm_secret" not in updated
    assert agents_mgr.encrypted_api_key(agents[0]) == "encrypted-blob"
    with pytest.raises(ValueError, match="cannot update"):
        agents_mgr.update(agents[0], tenant_id="ten_other")


def test_agent_constraint_violations_are_named_precisely(db):
    tenant, agents, _ = make_tenant(2)
    agents_mgr = Scoped(IsolationContext(tenant)).agents
    other_name = agents_mgr.get(agents[1])["name"]
    with pytest.raises(InvalidValueError, match="status"):
        agents_mgr.update(agents[0], status="sleeping")
    with pytest.raises(NotFound, match="agent template"):
        agents_mgr.update(agents[0], template_id="no_such_template")
    with pytest.raises(NotFound, match="agent template"):
        agents_mgr.create(name="new", persona={}, config={}, llm={}, template_id="no_such_template")
    with pytest.raises(Conflict, match=other_name):
        agents_mgr.update(agents[0], name=other_name)
    assert agents_mgr.update(agents[0], template_id="caring_friend", status="disabled")["status"] == "disabled"
