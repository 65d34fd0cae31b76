"""Settings-, connection- and provisioning-dependent paths of `isolation` (both legs, PostgreSQL parts skip)."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import socket

import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken
from peewee import SqliteDatabase
from playhouse.pool import PooledPostgresqlDatabase
from psycopg import sql
from pydantic import ValidationError

from isolation import IsolationContext, Scoped, crypto, migrate, system
from isolation import db as isolation_db
from isolation.agent_config import LlmSettings, Persona
from isolation.config import get_base_settings
from isolation.db import make_database, parse_database_url
from tests.conftest import DB_KIND
from tests.isolation.conftest import make_tenant
from testsupport.databases import (
    PostgresUnavailable,
    _conninfo,
    _with_db_and_user,
    postgres_available,
    provision_database,
)

PUBLIC_DEV_SECRET = "maitenant-development-secret-change-me"  # the default of earlier versions
needs_postgres = pytest.mark.skipif(DB_KIND != "postgresql", reason="needs the PostgreSQL leg")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_secrets(monkeypatch):
    for name in ("SECRET_KEY", "MAITENANT_ENCRYPTION_KEY", "ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    crypto.reset_cache()
    yield monkeypatch
    crypto.reset_cache()


@pytest.fixture
def detached_proxy(db):
    """The shared `database` proxy with nothing behind it; the session database comes back afterwards."""
    saved = isolation_db.database.obj
    isolation_db.database.initialize(None)
    try:
        yield
    finally:
        current = isolation_db.database.obj
        if current is not None and current is not saved:
            current.close()
        isolation_db.database.initialize(saved)


# -- crypto -------------------------------------------------------------------------------------
def test_an_explicit_encryption_key_is_used_and_a_wrong_key_cannot_decrypt(fresh_secrets):
    first, second = Fernet.generate_key(), Fernet.generate_key()
    fresh_secrets.setenv("MAITENANT_ENCRYPTION_KEY", first.decode())
    token = crypto.encrypt_secret("sk-provider-key")
    assert "sk-provider-key" not in token
    assert Fernet(first).decrypt(token.encode()) == b"sk-provider-key"
    assert crypto.decrypt_secret(token) == "sk-provider-key"
    fresh_secrets.setenv("MAITENANT_ENCRYPTION_KEY", second.decode())
    crypto.reset_cache()
    with pytest.raises(crypto.SecretBoxError, match="cannot be decrypted"):
        crypto.decrypt_secret(token)


def test_the_public_development_secret_is_refused_and_the_data_dir_secret_is_used(fresh_secrets, tmp_path):
    for environment in ("development", "production"):
        fresh_secrets.setenv("ENVIRONMENT", environment)
        fresh_secrets.setenv("SECRET_KEY", PUBLIC_DEV_SECRET)
        crypto.reset_cache()
        with pytest.raises(crypto.SecretBoxError, match="public development value"):
            crypto.encrypt_secret("x")
    # No SECRET_KEY (production too): the secret generated in DATA_DIR derives the key.
    fresh_secrets.delenv("SECRET_KEY")
    fresh_secrets.setenv("DATA_DIR", str(tmp_path))
    crypto.reset_cache()
    crypto.check_key()
    token = crypto.encrypt_secret("sk-provider-key")
    assert crypto.decrypt_secret(token) == "sk-provider-key"
    assert (tmp_path / "secret_key").exists()
    # The key of the old public default cannot read it, nor can one derived from another SECRET_KEY.
    public = hashlib.sha256(b"maitenant-fernet\x00" + PUBLIC_DEV_SECRET.encode()).digest()
    with pytest.raises(InvalidToken):
        Fernet(base64.urlsafe_b64encode(public)).decrypt(token.encode())
    fresh_secrets.setenv("SECRET_KEY", "a-real-production-secret-of-enough-length")
    crypto.reset_cache()
    with pytest.raises(crypto.SecretBoxError, match="cannot be decrypted"):
        crypto.decrypt_secret(token)


def test_an_invalid_encryption_key_is_refused_without_echoing_it(fresh_secrets):
    fresh_secrets.setenv("MAITENANT_ENCRYPTION_KEY", "not-a-fernet-key-but-secret")
    with pytest.raises(crypto.SecretBoxError, match="not a valid Fernet key") as refused:
        crypto.check_key()
    assert "not-a-fernet-key-but-secret" not in str(refused.value)


# -- agent config -------------------------------------------------------------------------------
def test_persona_list_items_are_limited_and_llm_settings_store_as_json():
    with pytest.raises(ValidationError, match="at most 200 characters"):
        Persona(interests=["ok", "x" * 201])
    with pytest.raises(ValidationError, match="at most 200 characters"):
        Persona(states=["y" * 201])
    assert Persona(interests=["z" * 200]).interests == ["z" * 200]
    stored = LlmSettings(provider="openai", base_url="https://llm.example.test/v1", model="m").stored()
    assert stored["base_url"] == "https://llm.example.test/v1" and isinstance(stored["base_url"], str)
    assert stored["provider"] == "openai" and stored["temperature"] == 0.7


# -- system -------------------------------------------------------------------------------------
def test_unknown_tenant_types_are_refused_before_anything_is_written(db):
    suffix = secrets.token_hex(4)
    account = system.create_account(f"tt_{suffix}", f"tt_{suffix}@example.test", "hash")
    with pytest.raises(ValueError, match="tenant type"):
        system.create_tenant("typed", account["id"], tenant_type="galactic")
    assert system.account_memberships(account["id"]) == []
    enterprise = system.create_tenant("typed", account["id"], tenant_type="enterprise", settings={"k": 1})
    assert (enterprise["type"], enterprise["settings"]) == ("enterprise", {"k": 1})


# -- db -----------------------------------------------------------------------------------------
def test_a_postgresql_url_may_leave_out_host_port_and_user():
    assert parse_database_url("postgresql:///only_db").params == {"dbname": "only_db"}
    assert parse_database_url("postgres://h/d?sslmode=disable").params == {
        "dbname": "d",
        "host": "h",
        "sslmode": "disable",
    }


def test_sqlite_urls_are_described_by_their_path():
    assert migrate.describe("sqlite:///data/maitenant.db") == "sqlite data/maitenant.db"
    assert migrate.describe("sqlite:////var/lib/mt.db") == "sqlite /var/lib/mt.db"


def test_an_in_memory_sqlite_database_works_without_a_folder():
    database = make_database("sqlite:///:memory:")
    assert isinstance(database, SqliteDatabase) and database.database == ":memory:"
    with database.connection_context():
        assert database.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
        database.execute_sql("CREATE TABLE t (x INTEGER)")
        database.execute_sql("INSERT INTO t VALUES (1)")
        assert database.execute_sql("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    assert not os.path.exists(":memory:")


def test_configure_closes_the_previous_database(detached_proxy, tmp_path):
    first = isolation_db.configure(f"sqlite:///{tmp_path}/one.db")
    first.connect()
    assert not first.is_closed()
    second = isolation_db.configure(f"sqlite:///{tmp_path}/two.db")
    assert first.is_closed()
    assert isolation_db.database.obj is second


def test_an_unconfigured_proxy_configures_itself_from_the_settings(detached_proxy, tmp_path, monkeypatch):
    path = tmp_path / "from_settings.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    get_base_settings.cache_clear()
    try:
        with isolation_db.unit_of_work():
            assert isolation_db.database.execute_sql("SELECT 1").fetchone()[0] == 1
        assert isinstance(isolation_db.database.obj, SqliteDatabase)
        assert isolation_db.database.obj.database == str(path)
        assert path.exists()
    finally:
        monkeypatch.undo()
        get_base_settings.cache_clear()


@needs_postgres
def test_without_an_app_role_connections_keep_the_urls_own_role(provisioned):
    owner_user = parse_database_url(provisioned.admin_url).params.get("user", "postgres")
    as_owner = make_database(provisioned.admin_url, app_role="")
    as_app = make_database(provisioned.admin_url, app_role=provisioned.app_role)
    try:
        assert as_owner.execute_sql("SELECT current_user").fetchone()[0] == owner_user
        assert as_app.execute_sql("SELECT current_user").fetchone()[0] == provisioned.app_role
    finally:
        as_owner.close_all()
        as_app.close_all()


@pytest.fixture
def two_tenants(db):
    """Made before `detached_proxy` takes the session database away."""
    return make_tenant(2), make_tenant(1)


@needs_postgres
def test_a_plain_pooled_postgresql_database_also_binds_the_tenant(two_tenants, detached_proxy, provisioned):
    (tenant_a, agents_a, _), (tenant_b, _agents_b, _) = two_tenants
    params = dict(parse_database_url(provisioned.url).params)
    plain = PooledPostgresqlDatabase(params.pop("dbname"), prefer_psycopg3=True, **params)
    isolation_db.database.initialize(plain)
    try:
        assert isolation_db.is_postgres()
        with isolation_db.unit_of_work(write=True):
            isolation_db.bind_tenant(tenant_a)
            setting = plain.execute_sql("SELECT current_setting('app.tenant_id', true)").fetchone()[0]
            agents = plain.execute_sql("SELECT tenant_id, id FROM agents").fetchall()
        assert setting == tenant_a
        assert sorted(a for _t, a in agents) == sorted(agents_a)
        assert Scoped(IsolationContext(tenant_b)).agents.count() == 1
    finally:
        plain.close_all()


# -- testing helpers ----------------------------------------------------------------------------
def test_an_unreachable_server_is_reported_with_its_reason(monkeypatch):
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    reason = postgres_available(url)
    assert reason is not None and reason.startswith("OperationalError")
    monkeypatch.setenv("MAITENANT_TEST_PG_URL", url)
    with pytest.raises(PostgresUnavailable, match="is not reachable"), provision_database("postgresql"):
        pytest.fail("provisioning must not start without a server")


def test_unknown_database_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown database kind"), provision_database("oracle"):
        pytest.fail("unreachable")


def test_admin_urls_keep_their_password_and_app_urls_drop_it():
    base = "postgresql://admin:s3cret@db.example:6543/postgres"
    assert _with_db_and_user(base, "mt_x", None) == "postgresql://admin:s3cret@db.example:6543/mt_x"
    assert _with_db_and_user(base, "mt_x", "app") == "postgresql://app@db.example:6543/mt_x"
    assert _with_db_and_user("postgresql:///postgres", "d", None) == "postgresql://postgres@127.0.0.1:5432/d"


def test_keep_leaves_a_sqlite_database_behind():
    with provision_database("sqlite", keep=True) as database:
        path = parse_database_url(database.url).path
    try:
        assert os.path.exists(path)
        assert migrate.current_version(database.url) == migrate.LATEST_VERSION
    finally:
        shutil.rmtree(os.path.dirname(path))


@needs_postgres
def test_keep_leaves_a_postgresql_database_and_role_behind(provisioned):
    with provision_database("postgresql", keep=True) as database:
        pass
    dbname = parse_database_url(database.url).params["dbname"]
    try:
        assert migrate.current_version(database.admin_url) == migrate.LATEST_VERSION
        with psycopg.connect(_conninfo(database.url)) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == database.app_role
    finally:
        with psycopg.connect(_conninfo(provisioned.admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(database.app_role)))


def test_a_database_whose_version_cannot_be_read_is_refused_with_the_reason(tmp_path):
    garbage = tmp_path / "not_a_database.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    unreachable = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    for url in (f"sqlite:///{garbage}", unreachable):
        database = make_database(url, admin=True)
        with pytest.raises(migrate.SchemaVersionError, match="cannot read the schema version"):
            migrate.check_schema(database)
        database.close()


# -- migrations as a non-superuser owner --------------------------------------------------------
@needs_postgres
def test_a_non_superuser_owner_can_migrate_and_switch_to_the_app_role(provisioned):
    suffix = secrets.token_hex(4)
    owner, app, dbname = f"mt_own_{suffix}", f"mt_napp_{suffix}", f"mt_nsu_{suffix}"
    admin = _conninfo(provisioned.admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(owner)))
    owner_url = _with_db_and_user(provisioned.admin_url, dbname, owner)
    try:
        assert migrate.upgrade(owner_url, app_role=app) == [m.VERSION for m in migrate.MIGRATIONS]
        assert migrate.upgrade(owner_url, app_role=app) == []  # the role exists now: grants are re-applied
        with psycopg.connect(_conninfo(owner_url), autocommit=True) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
            login, can_login = conn.execute(
                "SELECT current_user, rolcanlogin FROM pg_roles WHERE rolname = %s", (app,)
            ).fetchone()
            assert (login, can_login) == (owner, False)
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
            assert conn.execute("SELECT current_user").fetchone()[0] == app
            assert conn.execute("SELECT COUNT(*) FROM agent_templates").fetchone()[0] == 5
            assert conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'x', now())")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(app)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))
