"""Fixtures of the end-to-end suite: a fresh database of the leg's kind and both backends as subprocesses.

`MAITENANT_TEST_DB=sqlite|postgresql` picks the leg (default sqlite). On the PostgreSQL leg an
unreachable server skips the suite with the reason locally and fails it when `CI=true`.

The servers are real `python -m configurator` and `python -m replier` processes on free ports, with
their logs in files that are attached to the report of any failing test. They are stopped with
SIGINT, so when the suite runs under `coverage run` (coverage's `patch = ["subprocess"]`) their
coverage data is saved too.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from testsupport.databases import ProvisionedDatabase, leg_database
from testsupport.servers import ServerNotReady, ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DB_KIND = os.environ.get("MAITENANT_TEST_DB", "sqlite")
IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT = 60.0
TEST_SECRET = "integration-suite-secret-key-0123456789abcdef"
# Anything started without SECRET_KEY keeps a generated secret in DATA_DIR (isolation/secret.py): the
# session gets a private one (inherited by subprocesses), never the repository's data/.
_DATA_DIR = tempfile.mkdtemp(prefix="maitenant-e2e-data-")
os.environ["DATA_DIR"] = _DATA_DIR
atexit.register(shutil.rmtree, _DATA_DIR, True)

_running: list[Server] = []


class Server(ServerProcess):
    """`python -m <name> <args>` on `port`, its output in `log_path`, healthy when /health says 200."""

    def __init__(self, name: str, port: int, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", name, *args]
        super().__init__(name, cmd, env=env, log_path=log_path, health_url=f"{url}/health", cwd=ROOT)
        self.port = port
        self.http_url = url
        self._log: IO[bytes] | None = None  # a log handle a subclass's start() may keep open; closed by stop()

    def wait_healthy(self, timeout: float) -> None:
        """Until /health says 200; ServerNotReady (with the log) if it exits first or `timeout` passes."""
        super().wait_healthy(timeout, probe_timeout=2.0)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT (graceful: uvicorn shuts down, coverage saves its data), then SIGKILL if it hangs."""
        code = super().stop(signal.SIGINT, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


@dataclass
class Servers:
    configurator: Server
    replier: Server
    database: ProvisionedDatabase

    @property
    def configurator_url(self) -> str:
        return self.configurator.http_url

    @property
    def replier_url(self) -> str:
        return f"ws://127.0.0.1:{self.replier.port}/ws"

    def cli_args(self) -> list[str]:
        """The CLI arguments that point a run at these servers (and their database, for cleanup)."""
        args = ["--configurator-url", self.configurator_url, "--replier-url", self.replier_url]
        args += ["--database-url", self.database.url, "--no-llm", "--no-progress"]
        if self.database.app_role:
            args += ["--database-app-role", self.database.app_role]
        return args


def server_env(database: ProvisionedDatabase, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        DATABASE_URL=database.url,
        SECRET_KEY=TEST_SECRET,
        ENVIRONMENT="development",
        LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
        # Cheap Argon2 parameters: the same code path, a fraction of the CPU on a small machine.
        PASSWORD_HASH_TIME_COST="1",
        PASSWORD_HASH_MEMORY_KIB="8192",
        # One session signs up many accounts and checks refused logins, all from 127.0.0.1: the
        # per-address limits (tested in tests/configurator/test_cfg_limits.py) would answer 429.
        REGISTER_RATE_LIMIT="100000",
        LOGIN_ADDRESS_RATE_LIMIT="100000",
        # Offline responder: deterministic replies, labelled as offline.
        LLM_PROVIDER="",
        # Agents' fake models listen on loopback, which the egress policy refuses unless allowed.
        LLM_ALLOWED_HOSTS="127.0.0.1",
        KEY_CACHE_SECONDS="0.5",
        REVOCATION_CHECK_SECONDS="1",
        SHUTDOWN_GRACE_SECONDS="5",
    )
    if database.app_role:
        env["DATABASE_APP_ROLE"] = database.app_role
    return env


@pytest.fixture(scope="session")
def provisioned() -> Iterator[ProvisionedDatabase]:
    """A fresh migrated database for the whole session (dropped at the end)."""
    with leg_database(DB_KIND, in_ci=IN_CI) as database:
        yield database


def start_all(servers: list[Server], timeout: float = START_TIMEOUT) -> None:
    """Start every server and wait until all answer /health; RuntimeError with their logs otherwise.

    The caller stops them (also after a failure: some may be running).
    """
    for server in servers:
        server.start()
        _running.append(server)
    deadline = time.monotonic() + timeout
    pending: list[Server] = []
    for server in servers:  # one shared deadline; once it has passed, each of the rest gets one check
        try:
            server.wait_healthy(deadline - time.monotonic())
        except ServerNotReady as exc:
            if exc.returncode is not None:  # "<name> exited with <code> while starting:\n<log>"
                raise
            pending.append(server)
    if pending:
        names = ", ".join(s.name for s in pending)
        raise RuntimeError(f"{names} not healthy after {timeout:g} s:\n" + "\n".join(s.log_tail() for s in pending))


def stop_all(servers: list[Server], log_dir: Path, *, keep_logs: bool) -> dict[str, int | None]:
    """Stop every server; keep their logs (and say where) when a test failed, else remove them."""
    codes = {server.name: server.stop() for server in servers}
    _running[:] = [server for server in _running if server not in servers]
    if keep_logs:
        print(f"\nserver logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return codes


def check_graceful_exit(codes: dict[str, int | None]) -> None:
    """A graceful stop (SIGINT) must not have crashed any backend."""
    crashed = {name: code for name, code in codes.items() if code not in (0, -signal.SIGINT)}
    if crashed:
        pytest.fail(f"backends exited badly on SIGINT: {crashed}")


@pytest.fixture(scope="session")
def servers(provisioned: ProvisionedDatabase, request: pytest.FixtureRequest) -> Iterator[Servers]:
    """Both backends on free ports against the session database, healthy (logs kept if a test failed)."""
    log_dir = Path(tempfile.mkdtemp(prefix="maitenant-e2e-"))
    started: list[Server] = []
    for name in ("configurator", "replier"):
        port = free_port()
        started.append(Server(name, port, server_env(provisioned, port), log_dir / f"{name}.log"))
    try:
        start_all(started)
        yield Servers(started[0], started[1], provisioned)
    finally:
        codes = stop_all(started, log_dir, keep_logs=bool(request.session.testsfailed))
    check_graceful_exit(codes)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the servers' recent logs to the report of a failing test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _running:
        for server in _running:
            report.sections.append((f"{server.name} log (last lines)", server.log_tail()))
