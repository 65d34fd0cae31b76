"""Database outages against a real `python -m configurator`: retryable 503s, quiet logs, honest /health.

Each test runs the server on a database of its own (the outage must not touch the suite's): SQLite
is locked by another process (`BEGIN EXCLUSIVE`), PostgreSQL refuses and drops connections
(`ALLOW_CONNECTIONS false` + `pg_terminate_backend`), and a full disk is a small tmpfs filled up.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cfg_helpers import PASSWORD, server_env

from testsupport.databases import ProvisionedDatabase, leg_database
from testsupport.faults import TmpfsUnavailable, database_outage, fill_disk, sqlite_on_a_small_disk
from testsupport.servers import free_port, healthy, running_server

DB_KIND = os.environ.get("MAITENANT_TEST_DB", "sqlite")
FAST = {"SQLITE_BUSY_TIMEOUT_MS": "300", "HEALTH_CACHE_SECONDS": "0", "HEALTH_WRITE_TIMEOUT_MS": "200"}


@pytest.fixture(scope="module")
def own_db() -> Iterator[ProvisionedDatabase]:
    with leg_database(DB_KIND, in_ci=os.environ.get("CI", "").lower() == "true") as database:
        yield database


def _configurator(database: ProvisionedDatabase, log_path: Path, **settings: str):
    port = free_port()
    env = server_env(database, port, **{**FAST, **settings})
    return running_server(
        [sys.executable, "-m", "configurator"], env=env, ready_url=f"http://127.0.0.1:{port}/health",
        log_path=log_path, ok=healthy, name="configurator", stop_timeout=20,
    ), f"http://127.0.0.1:{port}"  # fmt: skip


def _register(http: httpx.Client) -> httpx.Response:
    name = f"f{uuid.uuid4().hex[:10]}"
    return http.post(
        "/api/v1/auth/register", json={"username": name, "email": f"{name}@example.com", "password": PASSWORD}
    )


def _assert_retryable(response: httpx.Response, code: str, retry_after: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == retry_after
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"] == {"retryable": True}


def test_outage_answers_503_with_retry_after_logs_once_and_recovers(own_db, tmp_path):
    log_path = tmp_path / "configurator.log"
    server, base = _configurator(own_db, log_path)
    with server, httpx.Client(base_url=base, timeout=30) as http:
        first = _register(http)
        assert first.status_code == 201, first.text
        headers = {"Authorization": f"Bearer {first.json()['tokens']['access_token']}"}
        with database_outage(own_db):
            _assert_retryable(_register(http), "database_unavailable", "2")
            for _ in range(20):
                created = http.post("/api/v1/agents", json={"name": f"a-{uuid.uuid4().hex[:6]}"}, headers=headers)
                _assert_retryable(created, "database_unavailable", "2")
            health = http.get("/health")
            assert health.status_code == 503
            checks = health.json()["checks"]
            failing = "write" if own_db.kind == "sqlite" else "database"
            assert checks[failing].startswith("error: database_unavailable"), checks
            assert health.json()["error"]["details"]["checks"][failing] == checks[failing]
        # Back: the very first request works (dead pooled connections were dropped), and /health is green.
        created = http.post("/api/v1/agents", json={"name": "after-the-outage"}, headers=headers)
        assert created.status_code == 201, created.text
        assert http.get("/health").json()["checks"]["database"] == "ok"
    log = log_path.read_text()
    assert "internal_error" not in log and "Exception in ASGI application" not in log
    # 21 failed requests: one warning line (a later one would carry the count) and one traceback (the
    # driver's error chained to peewee's: two "Traceback" headers, one "During handling").
    assert log.count("database_unavailable: POST") == 1, log
    assert log.count("During handling of the above exception") == 1, log
    assert log.count("Traceback (most recent call last)") == 2, log


def test_a_full_disk_answers_503_storage_full_and_health_reports_the_disk(tmp_path):
    if DB_KIND != "sqlite":
        pytest.skip("a full disk is injected under the SQLite file (the PostgreSQL server's disk is not ours)")
    try:
        with sqlite_on_a_small_disk(tmp_path / "disk") as (url, disk):
            database = ProvisionedDatabase("sqlite", url, url, None)
            log_path = tmp_path / "configurator.log"
            server, base = _configurator(database, log_path, HEALTH_MIN_FREE_MB="1")
            with server, httpx.Client(base_url=base, timeout=30) as http:
                assert _register(http).status_code == 201
                filler = fill_disk(disk)
                full = _register(http)
                _assert_retryable(full, "storage_full", "30")
                health = http.get("/health")
                assert health.status_code == 503
                assert health.json()["checks"]["disk"].startswith("error: storage_full"), health.json()
                filler.unlink()
                assert _register(http).status_code == 201
                assert http.get("/health").status_code == 200
        log = log_path.read_text()
        assert "storage_full" in log and "internal_error" not in log
        assert "cannot rollback" not in log, log  # SQLite ended the transaction itself: no ROLLBACK on top
    except TmpfsUnavailable as exc:
        pytest.skip(f"no tmpfs for the full-disk test: {exc}")
