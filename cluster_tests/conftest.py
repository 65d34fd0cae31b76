"""The cluster suite (nox session `cluster`): the scale-out deployment `invoke start-cluster` runs,
on PostgreSQL, Redis and HAProxy, with two repliers and a configurator with two workers.

Everything is real: `testsupport.cluster.Cluster` starts the same processes and renders the same
deploy/haproxy.cfg.template as the invoke task. The maim_message clients and helpers are the replier
tests' (tests/replier/replier_support.py). Without PostgreSQL, Redis or haproxy the suite is skipped
with the reason, except with CI=true, where it fails.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "replier"))  # replier_support, fake_openai

from fake_openai import FakeOpenAI  # noqa: E402

from isolation import db as isolation_db  # noqa: E402
from testsupport.cluster import Cluster, ClusterError, check_requirements  # noqa: E402
from testsupport.databases import ProvisionedDatabase, leg_database  # noqa: E402
from testsupport.redis_server import TEST_REDIS_URL, unique_prefix  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
LOGIN_LIMIT = 3
_DATA_DIR = tempfile.mkdtemp(prefix="maitenant-cluster-data-")
os.environ["DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, True)


@pytest.fixture(scope="session")
def provisioned() -> Iterator[ProvisionedDatabase]:
    with leg_database("postgresql", in_ci=IN_CI) as database:
        yield database


@pytest.fixture(scope="session")
def configured_db(provisioned: ProvisionedDatabase):
    """The test process reads and writes the same database as the cluster (as the app role)."""
    real = isolation_db.configure(provisioned.url, app_role=provisioned.app_role)
    yield real
    isolation_db.close_database()


@pytest.fixture(scope="session")
def cluster(provisioned, configured_db) -> Iterator[Cluster]:
    try:
        check_requirements(TEST_REDIS_URL)
    except ClusterError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    run_dir = Path(tempfile.mkdtemp(prefix="maitenant-cluster-"))
    env = {
        "DATABASE_APP_ROLE": provisioned.app_role,
        "REVOCATION_CHECK_SECONDS": "600",  # only a signal can close a revoked key's connections in time
        "LIMITS_REFRESH_SECONDS": "60",  # ... or a suspended tenant's
        "LIMIT_WINDOW_SECONDS": "3600",  # the limit tests' counts fall in one window
        "LOGIN_RATE_LIMIT": str(LOGIN_LIMIT),
        "REGISTER_RATE_LIMIT": "100",  # every test registers its tenants from 127.0.0.1 (10 an hour by default)
        "PASSWORD_HASH_TIME_COST": "1",
        "PASSWORD_HASH_MEMORY_KIB": "8192",
        "SHUTDOWN_GRACE_SECONDS": "3",
        "LLM_PROVIDER": "",
        # The fake LLM (tests/replier/fake_openai.py) is on loopback, which agents may reach only so.
        "LLM_ALLOWED_HOSTS": "127.0.0.1",
        "LLM_MAX_RETRIES": "0",
        "LLM_MEMORY_EXTRACTION": "false",  # one model call per message (the order test counts them)
        "LLM_TIMEOUT_SECONDS": "10",
    }
    cluster = Cluster(
        database_url=provisioned.url,
        redis_url=TEST_REDIS_URL,
        run_dir=run_dir,
        replicas=2,
        redis_prefix=unique_prefix(),
        env=env,
    )
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        cluster = item.funcargs.get("cluster")
        if cluster is not None:
            for log in sorted(cluster.run_dir.glob("*.log")):
                report.sections.append((log.name, log.read_text(errors="replace")[-6000:]))
