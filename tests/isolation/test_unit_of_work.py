"""The one transaction and connection policy (`isolation.db`), and the one write path of chat rows."""

from __future__ import annotations

import orjson
import pytest
from peewee import SqliteDatabase

from isolation import IsolationContext, Scoped, fastpath
from isolation import db as isolation_db
from isolation.errors import InvalidValueError
from tests.conftest import DB_KIND
from tests.isolation.conftest import make_tenant

postgres_only = pytest.mark.skipif(DB_KIND != "postgresql", reason="tenant binding exists on PostgreSQL only")


def _bound_tenant() -> str | None:
    return isolation_db.database.execute_sql("SELECT current_setting('app.tenant_id', true)").fetchone()[0] or None


def test_sqlite_reads_run_without_a_transaction_and_writes_begin_immediate(db):
    if not isinstance(db, SqliteDatabase):
        pytest.skip("SQLite policy")
    with isolation_db.unit_of_work("ten_x"):
        assert not db.in_transaction()
    with isolation_db.unit_of_work(write=True):
        assert db.in_transaction()
        # BEGIN IMMEDIATE took the write lock: a second connection cannot write now.
        other = SqliteDatabase(db.database, timeout=0.05)
        with pytest.raises(Exception, match="locked"):
            other.execute_sql("BEGIN IMMEDIATE")
        other.close()
        with isolation_db.unit_of_work("ten_x"):  # a read inside a transaction stays in it
            assert db.in_transaction()


@postgres_only
def test_postgresql_reads_with_a_tenant_bind_each_statement_without_a_transaction(db):
    tenant_a, _agents, _account = make_tenant(0)
    tenant_b, _agents, _account = make_tenant(0)
    with isolation_db.connection():
        with isolation_db.unit_of_work():  # nothing to bind: no transaction either
            assert not db.in_transaction()
        with isolation_db.unit_of_work(tenant_a):
            # No BEGIN: each statement runs in its own implicit transaction behind its binding.
            assert not db.in_transaction() and _bound_tenant() == tenant_a
            assert _session_binding(db) is None  # the binding ended with that statement
            with isolation_db.unit_of_work(tenant_b):  # nested read: re-bound
                assert _bound_tenant() == tenant_b
            assert _bound_tenant() == tenant_a  # and back to the outer tenant
            with isolation_db.unit_of_work(tenant_a, write=True):  # a write inside: one transaction
                assert db.in_transaction() and _bound_tenant() == tenant_a
        assert _bound_tenant() is None and _session_binding(db) is None
        with isolation_db.unit_of_work(write=True):
            assert db.in_transaction() and _bound_tenant() is None
            with isolation_db.unit_of_work(tenant_a, write=True):
                assert _bound_tenant() == tenant_a
            with isolation_db.unit_of_work(tenant_b):  # a read inside a transaction binds it
                assert db.in_transaction() and _bound_tenant() == tenant_b


def _session_binding(db) -> str | None:
    """The binding as the connection itself holds it, read past peewee (and past any pipeline)."""
    return db.connection().execute("SELECT current_setting('app.tenant_id', true)").fetchone()[0] or None


@postgres_only
def test_a_read_without_a_transaction_cannot_write(db):
    from peewee import InternalError

    from isolation.models import Tenant

    tenant_a, _agents, _account = make_tenant(0)
    with isolation_db.connection(), isolation_db.unit_of_work(tenant_a):
        with pytest.raises(InternalError, match="read-only transaction"):
            Tenant.update(name="written by a read").where(Tenant.id == tenant_a).execute()
        assert not db.in_transaction()
        assert Scoped(IsolationContext(tenant_a)).tenant.get()["name"] != "written by a read"
        # What cannot share the binding's pipeline (a query hook, a named cursor) is refused, never run unbound.
        db.query_hooks.append(lambda event: None)
        try:
            with pytest.raises(RuntimeError, match="needs a transaction"):
                db.execute_sql("SELECT 1")
        finally:
            db.query_hooks.pop()


@postgres_only
def test_a_forged_binding_lasts_one_statement_and_never_reaches_the_pool(db):
    """A statement that binds another tenant (as a bug or an injection would) changes nothing for the
    next statement of the read, nor for the next user of the pooled connection."""
    tenant_a, agents_a, _account = make_tenant(2)
    tenant_b, _agents_b, _account = make_tenant(3)
    forge_local = "SELECT set_config('app.tenant_id', %s, true)"
    isolation_db.close_connection()  # each block below takes the connection from the pool and gives it back
    with isolation_db.connection(), isolation_db.unit_of_work(tenant_a):
        assert db.execute_sql(forge_local, (tenant_b,)).fetchone()[0] == tenant_b
        assert _bound_tenant() == tenant_a
        assert {a["id"] for a in Scoped(IsolationContext(tenant_a)).agents.list()} == set(agents_a)
        assert db.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == len(agents_a)

    # A connection handed back in the middle of a transaction that bound another tenant: the pool
    # rolls it back at check-in, so its next user starts with no binding at all.
    with isolation_db.connection():
        raw = db.connection()
        key = db.conn_key(raw)
        raw.execute("BEGIN")
        raw.execute(forge_local, (tenant_b,))
    with isolation_db.connection():
        assert db.conn_key(db.connection()) == key  # the same pooled connection
        assert _session_binding(db) is None
        assert db.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == 0  # unbound: no rows
        with isolation_db.unit_of_work(tenant_a):
            assert {a["id"] for a in Scoped(IsolationContext(tenant_a)).agents.list()} == set(agents_a)

    # Even a session-wide binding left on a connection (`is_local` false, which this code never
    # sends) is overridden by the transaction-local binding of every scoped read and write.
    with isolation_db.connection():
        db.connection().execute("SELECT set_config('app.tenant_id', %s, false)", (tenant_b,))
        try:
            with isolation_db.unit_of_work(tenant_a):
                assert db.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == len(agents_a)
            with isolation_db.unit_of_work(tenant_a, write=True):
                assert db.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == len(agents_a)
        finally:
            db.connection().execute("RESET app.tenant_id")


@postgres_only
def test_a_pooled_connection_is_handed_out_again_without_a_round_trip_when_it_came_back_recently(db):
    """peewee's pool sends `SELECT 1` on every check-out, under its lock; ours only after an idle second."""
    from testsupport.databases import admin_url

    isolation_db.close_connection()
    with isolation_db.connection():
        conn = db.connection()
        pid = conn.info.backend_pid
    with isolation_db.connection():  # back a moment ago: handed out as it is
        assert db.connection() is conn
    import psycopg

    with psycopg.connect(_admin_conninfo(admin_url()), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Within the window the pool does not ask the server (a `SELECT 1` would find it cut) ...
    assert db._is_closed(conn) is False
    # ... after it, it does: the dead connection is dropped and a new one handed out.
    db._returned_at[db.conn_key(conn)] -= db.PING_AFTER_IDLE_SECONDS + 1
    with isolation_db.connection():
        assert db.connection() is not conn and db.connection().info.backend_pid != pid
        isolation_db.ping()


@postgres_only
def test_the_application_role_is_a_startup_option_that_a_pooled_connection_cannot_shed(db, provisioned):
    """No `SET ROLE` per check-out; `RESET ROLE` returns to the application role, and a connection that
    left it anyway (`SET ROLE NONE` with a superuser login) is dropped, never handed out again."""
    tenant_a, agents_a, _account = make_tenant(1)
    # Logged in as the (superuser) owner of the test database, switched to the application role.
    own = isolation_db.make_database(provisioned.admin_url, app_role=provisioned.app_role)

    def current_user() -> str:
        return own.connection().execute("SELECT current_user").fetchone()[0]

    try:
        with own.connection_context():
            conn = own.connection()
            assert current_user() == provisioned.app_role
            assert conn.execute("SELECT session_user").fetchone()[0] != provisioned.app_role
            conn.execute("RESET ROLE")
            assert current_user() == provisioned.app_role  # the startup option is the reset value
        with own.connection_context():
            assert own.connection() is conn
            conn.execute("SET ROLE NONE")
            assert current_user() != provisioned.app_role
        with own.connection_context():
            assert own.connection() is not conn and conn.closed
            assert current_user() == provisioned.app_role
            assert own.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == 0  # unbound under RLS
            own.execute_sql("SELECT set_config('app.tenant_id', %s, false)", (tenant_a,))
            assert own.execute_sql("SELECT count(*) FROM agents").fetchone()[0] == len(agents_a)
    finally:
        own.close_all()


def _admin_conninfo(url: str) -> str:
    from testsupport.databases import _conninfo

    return _conninfo(url)


def test_a_nested_write_is_a_savepoint(db):
    tenant_id, _agents, _account = make_tenant(0)
    scoped = Scoped(IsolationContext(tenant_id))
    with isolation_db.unit_of_work(tenant_id, write=True):
        scoped.tenant.update(name="outer")
        with pytest.raises(RuntimeError), isolation_db.unit_of_work(tenant_id, write=True):
            scoped.tenant.update(name="inner")
            raise RuntimeError("roll the savepoint back")
    assert scoped.tenant.get()["name"] == "outer"


def test_connection_close_and_ping_follow_the_configured_database(db):
    isolation_db.close_connection()
    assert db.is_closed()
    isolation_db.close_connection()  # closing twice is fine
    with isolation_db.connection():
        with isolation_db.connection():  # nested: left to the outer block
            isolation_db.ping()
        assert not db.is_closed()
    # SQLite keeps the thread's connection open between uses; a pool gets it back.
    assert db.is_closed() is (DB_KIND == "postgresql")


def _stream(tenant_id: str, agent_id: str) -> IsolationContext:
    row = Scoped(IsolationContext(tenant_id, agent_id, "qq")).chat_streams.get_or_create(user_id="u1")
    return IsolationContext(tenant_id, agent_id, "qq", row["id"])


def test_managers_and_the_replier_write_chat_rows_the_same_way(db):
    tenant_id, agents, _account = make_tenant(1)
    ctx = _stream(tenant_id, agents[0])
    message = {"direction": "in", "text": "hi", "segments": [{"type": "text"}], "sender_nickname": "n"}
    usage = {"provider": "p", "model": "m", "outcome": "ok", "prompt_tokens": 2, "latency_ms": 5}
    by_manager, created = Scoped(ctx).messages.add(message_id="m1", **message)
    assert created and not Scoped(ctx).messages.add(message_id="m1", **message)[1]
    Scoped(ctx).llm_usage.record(**usage)
    with isolation_db.unit_of_work(write=True):
        session = fastpath.ChatSession(ctx)
        assert session.insert_message(message_id="m2", **message)
        session.record_usage(**usage)
    by_session = Scoped(ctx).messages.by_message_id("m2")
    volatile = ("id", "message_id", "created_at")
    assert {k: v for k, v in by_manager.items() if k not in volatile} == {
        k: v for k, v in by_session.items() if k not in volatile
    }
    rows = Scoped(ctx).llm_usage.list()
    assert len(rows) == 2 and len({(r["provider"], r["prompt_tokens"], r["chat_stream_id"]) for r in rows}) == 1
    # The same refusals, before anything is written, whoever writes.
    for bad in ({"text": "a\x00b"}, {"segments": [float("nan")]}):
        with pytest.raises(InvalidValueError):
            Scoped(ctx).messages.add(message_id="bad", **(message | bad))
        with isolation_db.unit_of_work(write=True), pytest.raises(InvalidValueError):
            fastpath.ChatSession(ctx).insert_message(message_id="bad", **(message | bad))
    with pytest.raises(InvalidValueError):
        Scoped(ctx).llm_usage.record(**(usage | {"error": "\x00"}))
    assert Scoped(ctx).messages.count() == 2


class _WireTrace:
    """libpq's own protocol trace of this thread's connection: counts what the client sends."""

    def __init__(self, db, path) -> None:
        self.db, self.path = db, path

    def __enter__(self):
        self.file = open(self.path, "w")
        self.pgconn = self.db.connection().pgconn
        self.pgconn.trace(self.file.fileno())
        return self

    def __exit__(self, *exc) -> None:
        self.pgconn.untrace()
        self.file.close()

    def sent(self) -> list[str]:
        with open(self.path) as fh:
            return [line.split("\t")[3].strip() for line in fh if line.split("\t")[1:2] == ["F"]]

    def round_trips(self) -> int:
        """Each round trip ends with a Sync (extended protocol, pipelines) or is one Query."""
        return sum(1 for kind in self.sent() if kind in ("Sync", "Query"))


@postgres_only
def test_begin_and_the_binding_go_with_the_first_statement_and_an_empty_transaction_sends_nothing(db, tmp_path):
    tenant_a, _agents, _account = make_tenant(0)
    with isolation_db.connection():
        with _WireTrace(db, tmp_path / "one") as trace, isolation_db.unit_of_work(tenant_a, write=True):
            assert _bound_tenant() == tenant_a
        assert trace.round_trips() == 2  # BEGIN + binding + the statement, then COMMIT
        with _WireTrace(db, tmp_path / "read") as trace, isolation_db.unit_of_work(tenant_a):
            assert _bound_tenant() == tenant_a
            assert _bound_tenant() == tenant_a
        assert trace.round_trips() == 2  # a read: binding + statement, one round trip each, no BEGIN/COMMIT
        assert "Query" not in trace.sent()
        with _WireTrace(db, tmp_path / "none") as trace:
            with isolation_db.unit_of_work(tenant_a):
                pass
            with isolation_db.unit_of_work(tenant_a, write=True):
                pass
        assert trace.round_trips() == 0
        assert _bound_tenant() is None  # outside any transaction: nothing left over


@postgres_only
def test_a_batch_rebinding_tenants_runs_each_statement_under_the_last_binding(db):
    tenant_a, _agents, _account = make_tenant(0)
    tenant_b, _agents, _account = make_tenant(0)
    tenant_c, _agents, _account = make_tenant(0)
    with isolation_db.connection(), isolation_db.unit_of_work(write=True):
        isolation_db.bind_tenant(tenant_a)
        assert _bound_tenant() == tenant_a
        assert Scoped(IsolationContext(tenant_a)).tenant.get()["id"] == tenant_a
        isolation_db.bind_tenant(tenant_b)  # never sent: replaced by the next binding
        isolation_db.bind_tenant(tenant_c)
        assert _bound_tenant() == tenant_c
        # Row-level security follows the binding: tenant A's row is not visible under C's.
        assert db.execute_sql("SELECT count(*) FROM tenants WHERE id = %s", (tenant_a,)).fetchone()[0] == 0
        isolation_db.bind_tenant(tenant_b)
        cursor = db.cursor()  # a direct cursor (executemany users) gets the binding first too
        cursor.execute("SELECT current_setting('app.tenant_id', true)")
        assert cursor.fetchone()[0] == tenant_b
        with isolation_db.unit_of_work(tenant_a, write=True):  # a savepoint: sent before it
            assert _bound_tenant() == tenant_a


@postgres_only
def test_a_failing_first_statement_rolls_back_and_leaves_no_binding(db):
    tenant_a, _agents, _account = make_tenant(0)
    with isolation_db.connection():
        with pytest.raises(Exception, match="no_such_table"), isolation_db.unit_of_work(tenant_a, write=True):
            db.execute_sql("SELECT * FROM no_such_table")
        assert not db.in_transaction()
        with isolation_db.unit_of_work(write=True):
            assert _bound_tenant() is None
            assert db.execute_sql("SELECT count(*) FROM tenants").fetchone()[0] == 0  # RLS: no tenant, no rows


@postgres_only
def test_the_configurators_agents_page_is_one_round_trip_per_request(db, tmp_path):
    """`GET /agents`' database work: a pooled connection handed out again without `SELECT 1` or
    `SET ROLE`, the binding and the membership-with-page statement in one pipeline, and no COMMIT."""
    from datetime import timedelta

    from configurator.api.deps import Principal
    from isolation.ids import utcnow

    tenant_a, _agents, account = make_tenant(3)
    expires = utcnow() + timedelta(days=1)
    Scoped(IsolationContext(tenant_a)).refresh_tokens.issue("jti-rt", account, expires, session_id="s1")
    principal = Principal(account, tenant_a, "s1")
    isolation_db.close_connection()
    for _ in range(6):  # psycopg prepares a statement on its fifth run: measure the steady state
        principal.agents_page(50, 0)
    with isolation_db.connection():
        conn = db.connection()
    with _WireTrace(db, tmp_path / "page") as trace:  # traces that (now idle) pooled connection
        isolation_db.close_connection()
        items, more = principal.agents_page(50, 0)
    assert len(orjson.loads(items)) == 3 and more is False
    assert trace.round_trips() == 1 and trace.sent().count("Parse") == 0  # prepared statements
    assert db.is_closed() and db._connections[0][2] is conn


@postgres_only
def test_a_transaction_whose_connection_was_lost_ends_with_that_error_alone(db):
    """No check-out round trip finds a cut connection any more: its first statement does. The
    rollback then sends nothing (the server ended the transaction), so the outage's own error is
    what the caller sees, not "the connection is closed" from a failed ROLLBACK on top of it."""
    import psycopg
    from peewee import OperationalError

    tenant_a, _agents, _account = make_tenant(0)
    isolation_db.close_connection()
    with isolation_db.connection():
        lost = db.connection()
        with pytest.raises(OperationalError) as raised, isolation_db.unit_of_work(tenant_a, write=True):
            lost.close()  # as a server restart would leave it
            db.execute_sql("SELECT 1")
        # peewee's wrapper of the driver's error and nothing more: no second error from a ROLLBACK
        assert isinstance(raised.value.__context__, psycopg.Error)
        assert raised.value.__context__.__context__ is None
        assert not db.in_transaction()
    with isolation_db.connection():  # the pool dropped it; the next user gets a working one
        assert db.connection() is not lost
        isolation_db.ping()


def test_a_transaction_sqlite_ended_by_itself_ends_with_the_real_error_alone(db):
    """SQLite ends a transaction itself on some errors (a COMMIT on a full disk: SQLITE_FULL). The
    rollback then sends nothing, so the caller sees that error, not "cannot rollback - no
    transaction is active" from a ROLLBACK on top of it (two tracebacks per failure, the wrong one last)."""
    if not isinstance(db, SqliteDatabase):
        pytest.skip("SQLite ends transactions by itself")
    from peewee import OperationalError

    with pytest.raises(OperationalError, match="disk is full") as raised, isolation_db.unit_of_work(write=True):
        db.connection().execute("ROLLBACK")  # what SQLite did when the COMMIT met a full disk
        raise OperationalError("database or disk is full")
    assert raised.value.__context__ is None
    assert not db.in_transaction()
    with isolation_db.unit_of_work(write=True):  # the connection is usable, transactions work
        assert db.in_transaction()


@postgres_only
def test_commit_without_flush_is_local_to_its_transaction_and_costs_no_round_trip(db, tmp_path):
    def setting() -> str:
        return db.execute_sql("SELECT current_setting('synchronous_commit')").fetchone()[0]

    with isolation_db.connection():
        with pytest.raises(RuntimeError, match="open transaction"):
            isolation_db.commit_without_flush()
        for _ in range(6):  # psycopg prepares a statement on its fifth run: measure the steady state
            with isolation_db.unit_of_work(write=True):
                isolation_db.commit_without_flush()
                setting()
        with _WireTrace(db, tmp_path / "relaxed") as trace, isolation_db.unit_of_work(write=True):
            isolation_db.commit_without_flush()
            assert setting() == "off"
        assert trace.round_trips() == 2  # BEGIN + SET LOCAL + the statement, then COMMIT
        with isolation_db.unit_of_work(write=True):
            assert setting() == "on"
            isolation_db.commit_without_flush()  # after a statement: sent at once, still transaction-local
            assert setting() == "off"
        assert setting() == "on"
