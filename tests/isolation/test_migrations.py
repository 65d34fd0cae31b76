"""Migrations: from empty, re-runnable, and unknown versions refused with a clear message."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from peewee import PostgresqlDatabase

from isolation import migrate
from isolation.db import make_database
from isolation.errors import SchemaVersionError
from tests.conftest import DB_KIND
from testsupport.databases import provision_database

EXPECTED_TABLES = {
    "accounts",
    "tenants",
    "agent_templates",
    "memberships",
    "refresh_tokens",
    "agents",
    "api_keys",
    "chat_streams",
    "messages",
    "memories",
    "llm_usage",
    "schema_migrations",
}


@pytest.fixture
def fresh(provisioned):
    """A database of its own (migrations change the schema, so not the shared session one)."""
    with provision_database(provisioned.kind) as database:
        yield database


def _admin(database):
    return make_database(database.admin_url, admin=True)


def test_upgrade_from_empty_creates_every_table_and_seeds_templates(fresh):
    db = _admin(fresh)
    assert set(db.get_tables()) >= EXPECTED_TABLES
    assert migrate.check_schema(db) == migrate.LATEST_VERSION
    names = [r[0] for r in db.execute_sql("SELECT id FROM agent_templates ORDER BY id").fetchall()]
    assert names == [
        "caring_friend",
        "creative_companion",
        "efficient_helper",
        "friendly_assistant",
        "professional_expert",
    ]
    db.close()


def test_rerun_is_a_no_op(fresh):
    assert migrate.upgrade(fresh.admin_url, app_role=fresh.app_role) == []
    assert migrate.current_version(fresh.admin_url) == migrate.LATEST_VERSION
    db = _admin(fresh)
    assert db.execute_sql("SELECT COUNT(*) FROM agent_templates").fetchone()[0] == 5
    assert db.execute_sql("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(migrate.MIGRATIONS)
    db.close()


def test_unknown_newer_version_is_refused_by_upgrade_and_by_the_start_check(fresh):
    db = _admin(fresh)
    with db.atomic():
        db.execute_sql(
            f"INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', {db.param})",
            ("2030-01-01 00:00:00",),
        )
    with pytest.raises(SchemaVersionError, match="version 99, newer than this code knows"):
        migrate.upgrade(fresh.admin_url, app_role=fresh.app_role)
    with pytest.raises(SchemaVersionError, match="refusing to start"):
        migrate.check_schema(db)
    db.close()


def test_old_schema_is_refused_with_the_command_to_run():
    kind = DB_KIND
    with provision_database(kind) as database:
        db = _admin(database)
        with db.atomic():
            db.execute_sql(f"DELETE FROM schema_migrations WHERE version = {migrate.LATEST_VERSION}")
        with pytest.raises(SchemaVersionError, match="invoke db-upgrade"):
            migrate.check_schema(db)
        db.close()


def test_empty_database_reports_version_zero(tmp_path):
    url = f"sqlite:///{tmp_path}/empty.db"
    assert migrate.current_version(url) == 0
    db = make_database(url, admin=True)
    with pytest.raises(SchemaVersionError, match="version 0"):
        migrate.check_schema(db)
    db.close()


def test_cli_upgrade_then_check(tmp_path, capsys):
    from isolation.__main__ import main

    url = f"sqlite:///{tmp_path}/cli.db"
    assert main(["check", "--database-url", url]) == 2
    assert "invoke db-upgrade" in capsys.readouterr().err
    assert main(["upgrade", "--database-url", url]) == 0
    assert "applied: 1, 2" in capsys.readouterr().out
    assert main(["upgrade", "--database-url", url]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["check", "--database-url", url]) == 0
    assert main(["version", "--database-url", url]) == 0
    assert capsys.readouterr().out.strip().endswith(str(migrate.LATEST_VERSION))


class _SettingOnly(PostgresqlDatabase):
    """A PostgreSQL database object that answers `current_setting('autovacuum')` and nothing else."""

    def __init__(self, autovacuum: str) -> None:
        super().__init__("never-connected")
        self.autovacuum = autovacuum

    def execute_sql(self, sql, params=None, commit=None):
        assert "current_setting('autovacuum')" in sql
        return SimpleNamespace(fetchone=lambda: (self.autovacuum,))


@pytest.mark.parametrize("autovacuum", ["on", "off"])
def test_start_up_warns_about_a_postgresql_without_autovacuum(autovacuum, caplog, monkeypatch):
    """Without autovacuum, PostgreSQL never gathers statistics on the chat tables, and lookups by
    message id read whole chat streams (docs/RELIABILITY.md): the operator is told at start-up,
    once per process (each backend checks the schema twice while starting)."""
    monkeypatch.setattr(migrate, "_autovacuum_warned", False)
    with caplog.at_level(logging.WARNING, logger="isolation"):
        migrate._warn_without_autovacuum(_SettingOnly(autovacuum))
        migrate._warn_without_autovacuum(_SettingOnly(autovacuum))
    assert caplog.text.count("autovacuum off") == (1 if autovacuum == "off" else 0)


def test_start_up_on_the_real_server_warns_exactly_when_its_autovacuum_is_off(fresh, caplog, monkeypatch):
    monkeypatch.setattr(migrate, "_autovacuum_warned", False)
    db = _admin(fresh)
    try:
        off = fresh.kind == "postgresql" and db.execute_sql("SHOW autovacuum").fetchone()[0] == "off"
        with caplog.at_level(logging.WARNING, logger="isolation"):
            assert migrate.check_schema(db) == migrate.LATEST_VERSION
    finally:
        db.close()
    assert ("autovacuum off" in caplog.text) == off
