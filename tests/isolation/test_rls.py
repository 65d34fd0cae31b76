"""PostgreSQL defence in depth: row-level security binds the non-owner application role."""

from __future__ import annotations

import psycopg
import pytest

from isolation import IsolationContext, Scoped
from isolation import db as isolation_db
from tests.conftest import DB_KIND
from tests.isolation.conftest import make_tenant

pytestmark = pytest.mark.skipif(DB_KIND != "postgresql", reason="row-level security exists on PostgreSQL only")


def _raw(url_kind):
    from testsupport.databases import _conninfo

    return psycopg.connect(_conninfo(url_kind), autocommit=True)


@pytest.fixture
def two_tenants(db):
    tenant_a, agents_a, _ = make_tenant(2)
    tenant_b, agents_b, _ = make_tenant(1)
    return (tenant_a, agents_a), (tenant_b, agents_b)


def test_app_role_is_not_the_owner_and_cannot_bypass(provisioned, db):
    with _raw(provisioned.url) as conn:
        user, bypass, superuser = conn.execute(
            "SELECT current_user, rolbypassrls, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'agents'").fetchone()[0]
    assert user == provisioned.app_role
    assert (bypass, superuser) == (False, False)
    assert owner != user


def test_unscoped_select_sees_only_the_bound_tenant_and_nothing_unbound(provisioned, two_tenants):
    (tenant_a, agents_a), _b = two_tenants
    with _raw(provisioned.url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM tenants").fetchone()[0] == 0
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant_a,))
            rows = conn.execute("SELECT tenant_id, id FROM agents ORDER BY id").fetchall()
            assert {r[0] for r in rows} == {tenant_a}
            assert sorted(r[1] for r in rows) == sorted(agents_a)
        # transaction-local: the setting is gone after commit
        assert conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 0
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', '', true)")
            assert conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 0


def test_insert_for_another_tenant_is_rejected_by_the_policy(provisioned, two_tenants):
    (tenant_a, agents_a), (tenant_b, _agents_b) = two_tenants
    with _raw(provisioned.url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant_b,))
        conn.execute(
            "INSERT INTO memories (tenant_id, id, agent_id, level, content, source, created_at) "
            "VALUES (%s, 'mem_forged', %s, 'agent', 'x', 'test', now())",
            (tenant_a, agents_a[0]),
        )


def test_updates_and_deletes_across_tenants_touch_zero_rows(provisioned, two_tenants):
    (tenant_a, agents_a), (tenant_b, _agents_b) = two_tenants
    with _raw(provisioned.url) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant_b,))
        assert conn.execute("UPDATE agents SET name = 'x' WHERE id = %s", (agents_a[0],)).rowcount == 0
        assert conn.execute("DELETE FROM agents WHERE tenant_id = %s", (tenant_a,)).rowcount == 0
    assert Scoped(IsolationContext(tenant_a)).agents.count() == 2


def test_a_scoped_manager_with_a_bug_in_its_filter_still_sees_one_tenant(two_tenants):
    """Simulate the classic leak (a method missing its tenant filter): RLS still confines it."""
    (tenant_a, agents_a), (_tenant_b, _agents_b) = two_tenants
    database = isolation_db.database.obj
    with database.atomic():
        isolation_db.bind_tenant(tenant_a)
        ids = [r[0] for r in database.execute_sql("SELECT id FROM agents").fetchall()]
    assert sorted(ids) == sorted(agents_a)


def _backend_setting() -> str:
    database = isolation_db.database.obj
    return database.execute_sql("SELECT current_setting('app.tenant_id', true)").fetchone()[0] or ""


def test_binding_is_reused_within_a_transaction_and_gone_after_it(two_tenants):
    (tenant_a, agents_a), (tenant_b, _agents_b) = two_tenants
    database = isolation_db.database.obj
    with database.atomic():
        assert Scoped(IsolationContext(tenant_a)).agents.count() == 2
        assert _backend_setting() == tenant_a
        assert Scoped(IsolationContext(tenant_b)).agents.count() == 1  # rebinds for another tenant
        assert _backend_setting() == tenant_b
        assert Scoped(IsolationContext(tenant_a)).agents.get(agents_a[0])["id"] == agents_a[0]
    assert _backend_setting() == ""


def test_savepoint_rollback_undoes_the_binding_and_the_next_call_rebinds(two_tenants):
    """ROLLBACK TO SAVEPOINT reverts set_config; a cached binding must not survive it."""
    (tenant_a, agents_a), (tenant_b, _agents_b) = two_tenants
    database = isolation_db.database.obj
    with database.atomic():
        isolation_db.bind_tenant(tenant_b)
        try:
            with database.atomic():  # savepoint
                assert Scoped(IsolationContext(tenant_a)).agents.count() == 2
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
        assert _backend_setting() == tenant_b  # PostgreSQL restored the outer binding
        assert sorted(a["id"] for a in Scoped(IsolationContext(tenant_a)).agents.list()) == sorted(agents_a)
        assert _backend_setting() == tenant_a


def test_begin_and_binding_travel_together_outside_a_transaction(two_tenants):
    (tenant_a, agents_a), _b = two_tenants
    assert sorted(a["id"] for a in Scoped(IsolationContext(tenant_a)).agents.list()) == sorted(agents_a)
    assert _backend_setting() == ""  # committed: nothing left on the pooled connection
