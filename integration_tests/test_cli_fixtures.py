"""The suite's own fixtures when something goes wrong: a backend that dies or never gets healthy while
starting, one that hangs on shutdown, a missing PostgreSQL server, and the logs attached to failures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from integration_tests import conftest
from integration_tests.conftest import Server, check_graceful_exit, start_all, stop_all
from testsupport.databases import leg_database
from testsupport.servers import free_port


def test_a_server_that_exits_while_starting_fails_with_its_log(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    server = Server("integration_tests.no_such_module", free_port(), dict(os.environ), log_dir / "broken.log")
    try:
        with pytest.raises(RuntimeError) as raised:
            start_all([server], timeout=30)
    finally:
        codes = stop_all([server], log_dir, keep_logs=True)
    assert str(raised.value).startswith("integration_tests.no_such_module exited with 1 while starting:\n")
    assert "No module named integration_tests.no_such_module" in str(raised.value)
    assert codes == {"integration_tests.no_such_module": 1} and server not in conftest._running
    assert f"server logs kept in {log_dir}" in capsys.readouterr().out and log_dir.exists()
    assert server.stop() == 1  # stopping twice is harmless
    with pytest.raises(pytest.fail.Exception, match=r"backends exited badly on SIGINT: \{'integration_tests"):
        check_graceful_exit(codes)


def test_a_server_that_never_gets_healthy_times_out_with_its_log(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a plain HTTP server: it runs, but answers /health with 404
    server = Server("http.server", port, env, log_dir / "http.log", args=(str(port), "--bind", "127.0.0.1"))
    try:
        with pytest.raises(RuntimeError) as raised:
            start_all([server], timeout=2)
    finally:
        codes = stop_all([server], log_dir, keep_logs=False)
    message = str(raised.value)
    assert message.startswith("http.server not healthy after 2 s:\n")
    assert '"GET /health HTTP/1.1" 404' in message  # its log: it was asked and said no
    assert codes == {"http.server": 0} and not log_dir.exists()
    check_graceful_exit(codes)  # exited cleanly on SIGINT: no failure


class Stubborn(Server):
    """TEST DOUBLE: a backend that ignores SIGINT (hangs on shutdown)."""

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); "
        self.process = subprocess.Popen(
            [sys.executable, "-c", code + "time.sleep(60)"], stdout=self._log, stderr=subprocess.STDOUT
        )


def test_a_server_that_ignores_sigint_is_killed(tmp_path):
    server = Stubborn("stubborn", 0, {}, tmp_path / "stubborn.log")
    server.start()
    deadline = time.monotonic() + 30
    while "ready" not in server.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ready" in server.log_tail()
    assert server.stop(timeout=0.2) == -signal.SIGKILL
    with pytest.raises(pytest.fail.Exception, match=re.escape("backends exited badly on SIGINT: {'stubborn': -9}")):
        check_graceful_exit({"stubborn": -signal.SIGKILL, "fine": -signal.SIGINT})


def test_a_missing_log_is_reported_not_raised(tmp_path):
    assert Server("x", 0, {}, tmp_path / "missing.log").log_tail().startswith("(no log: [Errno 2]")


@pytest.mark.parametrize(
    ("in_ci", "outcome", "reason"),
    [(True, pytest.fail.Exception, "PostgreSQL leg needs a server: "), (False, pytest.skip.Exception, "skipped: ")],
)
def test_a_missing_postgresql_server_fails_in_ci_and_skips_elsewhere(monkeypatch, in_ci, outcome, reason):
    monkeypatch.setenv("MAITENANT_TEST_PG_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    with pytest.raises(outcome, match=reason) as raised:
        leg_database("postgresql", in_ci=in_ci).__enter__()  # provisioning happens on entering
    assert "127.0.0.1" in str(raised.value)


def test_the_report_of_a_failing_test_carries_the_server_logs(tmp_path, monkeypatch):
    log = tmp_path / "configurator.log"
    log.write_text("x" * 7000 + "Traceback: boom")
    monkeypatch.setattr(conftest, "_running", [Server("configurator", 0, {}, log)])

    def report_of(failed: bool) -> SimpleNamespace:
        report = SimpleNamespace(failed=failed, sections=[])
        hook = conftest.pytest_runtest_makereport(None, None)
        next(hook)
        with pytest.raises(StopIteration):
            hook.send(SimpleNamespace(get_result=lambda: report))
        return report

    ((title, text),) = report_of(True).sections
    assert title == "configurator log (last lines)" and text.endswith("Traceback: boom") and len(text) == 6000
    assert report_of(False).sections == []
