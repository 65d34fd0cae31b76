"""`testsupport.servers` against real tiny subprocesses: `python -m http.server` on a free port, scripts
that exit at once or ignore SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from testsupport.servers import (
    ServerNotReady,
    ServerProcess,
    ThreadedServer,
    answers,
    free_port,
    healthy,
    log_tail,
    pid_alive,
    port_free,
    running_server,
    spawn,
    stop_pid,
    stop_process,
    stop_processes,
    wait_http,
    wait_ready,
)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for_line(log_path: Path, text: str, proc: subprocess.Popen) -> None:
    wait_ready(lambda: text in log_tail(log_path), proc, 30, what=f"{text!r} in the log", interval=0.02)


def test_free_port_is_bindable_on_localhost():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_log_tail_is_the_end_and_a_missing_log_is_reported(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a" * 100 + "the end")
    assert log_tail(log, 7) == "the end" and len(log_tail(log)) == 107
    assert log_tail(tmp_path / "missing.log").startswith("(no log: [Errno 2]")


def test_running_server_waits_until_ready_and_stops_it_with_sigint():
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with running_server(http_server(port), env=ENV, ready_url=url, name="http.server") as server:
        assert server.process.poll() is None
        assert httpx.get(url, timeout=5).status_code == 200  # ready when the block starts
        log_path = server.log_path
        assert log_path.exists()
    assert server.process.returncode == 0  # http.server exits cleanly on KeyboardInterrupt, not killed
    assert not log_path.exists()  # the temporary log is removed


def test_a_process_that_exits_at_once_fails_fast_with_its_log(tmp_path):
    log_path = tmp_path / "boom.log"
    cmd = script("import sys; print('boom: no config'); sys.exit(3)")
    ready_url = f"http://127.0.0.1:{free_port()}/health"
    with (
        pytest.raises(ServerNotReady) as raised,
        running_server(cmd, env=ENV, ready_url=ready_url, log_path=log_path, timeout=30, name="boomer"),
    ):
        pytest.fail("the block must not run")
    assert raised.value.returncode == 3  # noticed the exit (a timeout would leave it None)
    assert str(raised.value).startswith("boomer exited with 3 while starting:\n")
    assert "boom: no config" in str(raised.value)
    assert log_path.exists()  # a given log is kept


def test_a_server_that_never_gets_healthy_times_out_with_its_log(tmp_path):
    port = free_port()
    proc = spawn(http_server(port), env=ENV, log_path=tmp_path / "http.log")
    try:
        url = f"http://127.0.0.1:{port}/health"  # http.server answers 404
        wait_http(url, proc, 30)  # the default accepts any answer below 500
        with pytest.raises(ServerNotReady) as raised:
            wait_http(url, proc, 0.5, ok=healthy, name="http.server", log_path=tmp_path / "http.log")
    finally:
        assert stop_process(proc) == 0
    assert raised.value.returncode is None
    assert str(raised.value).startswith(f"http.server not ready at {url} after 0.5 s:\n")
    assert '"GET /health HTTP/1.1" 404' in str(raised.value)


def test_wait_ready_with_no_time_left_probes_once():
    proc = subprocess.Popen(script("import time; time.sleep(30)"))
    calls = []
    try:
        with pytest.raises(ServerNotReady, match=r"^server not ready at nothing after 0 s$"):
            wait_ready(lambda: calls.append(1) or False, proc, 0, what="nothing")
        assert calls == [1]
        wait_ready(lambda: True, proc, -1, what="anything")
    finally:
        stop_process(proc)


def test_stop_process_sends_sigint_first_and_returns_the_exit_code(tmp_path):
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *_: (print('got SIGINT'), sys.exit(7)))\n"
        "print('ready')\n"
        "time.sleep(30)\n"
    )
    log_path = tmp_path / "graceful.log"
    proc = spawn(script(code), env=ENV, log_path=log_path)
    wait_for_line(log_path, "ready", proc)
    assert stop_process(proc) == 7
    assert "got SIGINT" in log_tail(log_path)
    assert stop_process(proc) == 7  # an ended process is left alone


def test_stop_process_kills_a_process_that_ignores_the_signal(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready'); time.sleep(30)"
    log_path = tmp_path / "stubborn.log"
    proc = spawn(script(code), env=ENV, log_path=log_path)
    wait_for_line(log_path, "ready", proc)
    assert stop_process(proc, timeout=0.2) == -signal.SIGKILL


def test_spawn_appends_so_a_restart_keeps_the_earlier_log(tmp_path):
    log_path = tmp_path / "twice.log"
    for word in ("first", "second"):
        proc = spawn(script(f"print({word!r})"), env=ENV, log_path=log_path)
        assert proc.wait(30) == 0
    assert log_tail(log_path).split() == ["first", "second"]


def test_a_failure_inside_the_block_shows_the_log_and_still_stops_the_server(tmp_path, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "http.log"
    with (
        pytest.raises(ZeroDivisionError),
        running_server(http_server(port), env=ENV, ready_url=url, log_path=log_path, name="web") as server,
    ):
        httpx.get(f"{url}only-in-the-log", timeout=5)
        1 / 0  # noqa: B018
    assert server.process.returncode == 0
    err = capsys.readouterr().err
    assert err.startswith("web log (last lines):\n") and "GET /only-in-the-log HTTP/1.1" in err


def test_running_server_without_ready_url_yields_at_once(tmp_path):
    with running_server(script("import time; time.sleep(30)"), env=None, ready_url=None, cwd=tmp_path) as server:
        assert server.process.poll() is None
    assert server.process.returncode == -signal.SIGINT  # Python ends on an uncaught KeyboardInterrupt by SIGINT


def test_port_free_tells_a_bound_port_from_a_free_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        assert not port_free("127.0.0.1", taken)
    assert port_free("127.0.0.1", free_port())


def test_server_process_starts_waits_restarts_and_stops(tmp_path):
    port = free_port()
    log_path = tmp_path / "web.log"
    server = ServerProcess(
        "web", http_server(port), env=ENV, log_path=log_path, health_url=f"http://127.0.0.1:{port}/", cwd=tmp_path
    )
    assert server.stop() is None  # never started: nothing to stop
    for _ in range(2):  # a restart appends to the same log
        server.start()
        server.wait_healthy(30)
        assert answers(f"http://127.0.0.1:{port}/", ok=healthy)
        assert server.stop() == 0
    assert server.log_tail().count('"GET / HTTP/1.1" 200') >= 2


def test_server_process_that_never_gets_healthy_names_itself_and_shows_its_log(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"  # http.server answers 404
    server = ServerProcess("web", http_server(port), env=ENV, log_path=tmp_path / "web.log", health_url=url)
    server.start()
    try:
        with pytest.raises(ServerNotReady) as raised:
            server.wait_healthy(0.5, log_chars=50)
    finally:
        server.stop()
    message = str(raised.value)
    assert message.startswith(f"web not ready at {url} after 0.5 s:\n") and len(message.split(":\n", 1)[1]) <= 50


def test_server_process_without_a_log_inherits_the_output(capfd):
    server = ServerProcess("quiet", script("print('to the terminal')"), env=ENV, log_path=None)
    server.start()
    assert server.process is not None and server.process.wait(30) == 0
    assert server.log_tail() == "(no log: output not captured)"
    assert "to the terminal" in capfd.readouterr().out


def test_answers_is_false_when_nothing_listens():
    assert not answers(f"http://127.0.0.1:{free_port()}/", timeout=0.5)


def test_stop_processes_signals_all_first_and_kills_the_stubborn(tmp_path):
    graceful = spawn(
        script("import time; print('ready', flush=True); time.sleep(30)"), env=ENV, log_path=tmp_path / "a"
    )
    ignoring = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready'); time.sleep(30)"
    stubborn = spawn(script(ignoring), env=ENV, log_path=tmp_path / "b")
    wait_for_line(tmp_path / "a", "ready", graceful)
    wait_for_line(tmp_path / "b", "ready", stubborn)
    stop_processes([graceful, stubborn], timeout=0.5)
    assert graceful.returncode == -signal.SIGINT and stubborn.returncode == -signal.SIGKILL


def test_stop_pid_stops_a_process_known_only_by_its_pid(tmp_path):
    proc = spawn(script("import time; print('ready', flush=True); time.sleep(30)"), env=ENV, log_path=tmp_path / "x")
    wait_for_line(tmp_path / "x", "ready", proc)
    assert pid_alive(proc.pid)
    reaper = threading.Thread(target=proc.wait)  # our child: reap it so the pid really disappears
    reaper.start()
    assert stop_pid(proc.pid, timeout=30) == "stopped"
    reaper.join(5)
    assert stop_pid(proc.pid) == "not running" and not pid_alive(proc.pid)


def test_stop_pid_kills_what_ignores_the_signal(tmp_path):
    ignoring = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready'); time.sleep(30)"
    proc = spawn(script(ignoring), env=ENV, log_path=tmp_path / "y")
    wait_for_line(tmp_path / "y", "ready", proc)
    reaper = threading.Thread(target=proc.wait)
    reaper.start()
    assert stop_pid(proc.pid, timeout=0.3) == "killed"
    reaper.join(5)
    assert proc.returncode == -signal.SIGKILL


def test_threaded_server_serves_an_asgi_app_until_stopped():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    server = ThreadedServer(app, name="tiny")
    server.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "hi"
    finally:
        server.stop()
    assert not answers(f"http://127.0.0.1:{server.port}/", timeout=0.5)
