"""The one server harness of the tests, benchmarks and tasks.py: start on a free port, wait until
ready, stop cleanly.

Functions for one-off use (`spawn`, `wait_http`, `stop_process`, the `running_server` block),
`ServerProcess` for a server a caller starts, restarts and stops itself (the integration suite's
backends, the replier tests' `ReplierProcess`, `invoke start-servers`), and `ThreadedServer` for an
in-process ASGI test double (the fake LLMs).

Readiness polling fails at once, with the log, when the process has died instead of waiting out the
deadline; stopping sends SIGINT first, so uvicorn shuts down gracefully and `coverage` (which patches
`subprocess`) saves the child's data, and SIGKILL only if it hangs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

StrPath = str | os.PathLike[str]
Env = Mapping[str, str] | None


def answered(status: int) -> bool:
    """The default readiness test: the server answers at all (not with a 5xx)."""
    return status < 500


def healthy(status: int) -> bool:
    """The readiness test for `/health`: exactly 200 (a 404 means some other server, or not yet)."""
    return status == 200


class ServerNotReady(RuntimeError):
    """The server did not get ready; `returncode` is set when it exited (None: the deadline passed)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class RunningServer:
    """What `running_server` yields: the process (pid, exit code, extra signals) and where its log is."""

    process: subprocess.Popen
    log_path: Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0, so the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether `port` on `host` can be bound now (SO_REUSEADDR: a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


LOG_CHARS = 6000


def log_tail(path: StrPath, chars: int = LOG_CHARS) -> str:
    """The end of a log, for error messages and test reports; a missing log is said, not raised."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def spawn(
    cmd: Sequence[str],
    *,
    env: Env,
    log_path: StrPath | None,
    cwd: StrPath | None = None,
    mode: str = "ab",
    new_session: bool = False,
) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr in `log_path` (appended by default: a restart keeps the
    earlier output; None: this terminal's). The parent's handle is closed at once; the child has its
    own. `new_session`: a terminal's Ctrl-C reaches only the caller, which stops the child itself."""
    if log_path is None:
        return subprocess.Popen(  # noqa: S603
            list(cmd), cwd=cwd, env=env, start_new_session=new_session, preexec_fn=_default_sigint
        )
    with open(log_path, mode) as log:
        return subprocess.Popen(  # noqa: S603
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A shell starts background jobs with
    SIGINT ignored, an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler: a server started from a CI script run in the background would
    ignore the graceful stop (SIGINT) and be killed after the timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_ready(
    probe: Callable[[], bool],
    proc: subprocess.Popen,
    timeout: float = 30.0,
    *,
    what: str,
    name: str = "server",
    log_path: StrPath | None = None,
    interval: float = 0.1,
    log_chars: int = LOG_CHARS,
) -> None:
    """Call `probe` until true; ServerNotReady if `proc` exits first (checked before every probe, so a
    crash fails at once) or `timeout` passes (<= 0: one check). With `log_path` the message ends with
    the log's last `log_chars`, so a failed start explains itself."""
    deadline = time.monotonic() + timeout
    tail = (lambda: f":\n{log_tail(log_path, log_chars)}") if log_path is not None else (lambda: "")
    while True:
        if proc.poll() is not None:
            raise ServerNotReady(f"{name} exited with {proc.returncode} while starting{tail()}", proc.returncode)
        if probe():
            return
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"{name} not ready at {what} after {timeout:g} s{tail()}")
        time.sleep(interval)


def wait_http(
    url: str,
    proc: subprocess.Popen,
    timeout: float = 30.0,
    *,
    ok: Callable[[int], bool] = answered,
    probe_timeout: float = 1.0,
    name: str = "server",
    log_path: StrPath | None = None,
    interval: float = 0.1,
    log_chars: int = LOG_CHARS,
) -> None:
    """`wait_ready` until GET `url` returns a status that `ok` accepts (default: any below 500)."""

    def probe() -> bool:
        return answers(url, ok=ok, timeout=probe_timeout)

    wait_ready(probe, proc, timeout, what=url, name=name, log_path=log_path, interval=interval, log_chars=log_chars)


def answers(url: str, *, ok: Callable[[int], bool] = answered, timeout: float = 1.0) -> bool:
    """One GET of `url`: whether it answered with a status that `ok` accepts (no answer: False)."""
    try:
        return ok(httpx.get(url, timeout=timeout).status_code)
    except httpx.HTTPError:
        return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
    """Send `sig`, wait `timeout`, then SIGKILL; the exit code. An ended process is left alone."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, sig: int = signal.SIGINT, timeout: float = 15.0) -> str:
    """`stop_process` for a process that is not our child (a detached server recorded by its pid):
    "not running", "stopped" or "killed" (it outlived `timeout`)."""
    if not pid_alive(pid):
        return "not running"
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        return "killed"
    return "stopped"


class ServerProcess:
    """A named server subprocess that its owner starts (again, if it likes: the log is appended),
    waits for and stops; its output goes to `log_path` (None: this terminal's)."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Env,
        log_path: StrPath | None,
        health_url: str | None = None,
        cwd: StrPath | None = None,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = env
        self.log_path = Path(log_path) if log_path is not None else None
        self.health_url = health_url
        self.cwd = cwd
        self.new_session = new_session
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = spawn(self.cmd, env=self.env, log_path=self.log_path, cwd=self.cwd, new_session=self.new_session)

    def wait_healthy(
        self, timeout: float, *, probe_timeout: float = 1.0, interval: float = 0.1, log_chars: int = LOG_CHARS
    ) -> None:
        """Until `health_url` says 200; ServerNotReady (ending with the log) if the process exits first
        or `timeout` passes."""
        assert self.process is not None and self.health_url is not None, "start() first, with a health_url"
        wait_http(
            self.health_url,
            self.process,
            timeout,
            ok=healthy,
            probe_timeout=probe_timeout,
            name=self.name,
            log_path=self.log_path,
            interval=interval,
            log_chars=log_chars,
        )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
        """`stop_process` (None: never started)."""
        return stop_process(self.process, sig, timeout) if self.process is not None else None

    def log_tail(self, chars: int = LOG_CHARS) -> str:
        return log_tail(self.log_path, chars) if self.log_path is not None else "(no log: output not captured)"


def stop_processes(processes: Sequence[subprocess.Popen], sig: int = signal.SIGINT, timeout: float = 15.0) -> None:
    """`stop_process` for several at once: every one gets `sig` first, so they shut down in parallel."""
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in processes:
        stop_process(proc, sig, timeout)


class ThreadedServer:
    """An ASGI test double served by uvicorn on a thread of this process, on a free loopback port."""

    def __init__(self, app: Any, *, name: str = "test-server", port: int | None = None) -> None:
        self.app = app
        self.name = name
        self.port = port or free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Serve and wait until uvicorn has started; RuntimeError after `timeout`."""
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


@contextmanager
def running_server(
    cmd: Sequence[str],
    *,
    env: Env,
    ready_url: str | None,
    cwd: StrPath | None = None,
    log_path: StrPath | None = None,
    timeout: float = 30.0,
    ok: Callable[[int], bool] = answered,
    name: str = "server",
    stop_timeout: float = 15.0,
) -> Iterator[RunningServer]:
    """`cmd` running (and ready, if `ready_url`) for the block, its output in `log_path` (truncated;
    None: a temporary file). A failed start raises ServerNotReady with the log's tail, a failure in the
    block prints that tail to stderr; the process is always stopped with `stop_process`."""
    temporary = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        os.close(fd)
    proc = spawn(cmd, env=env, log_path=log_path, cwd=cwd, mode="wb")
    try:
        if ready_url is not None:
            wait_http(ready_url, proc, timeout, ok=ok, name=name, log_path=log_path)
        try:
            yield RunningServer(proc, Path(log_path))
        except Exception:
            sys.stderr.write(f"{name} log (last lines):\n{log_tail(log_path)}\n")
            raise
    finally:
        stop_process(proc, timeout=stop_timeout)
        if temporary:
            Path(log_path).unlink(missing_ok=True)


# Benchmarks and load runs measure the pipeline at full speed from a few tenants: the per-tenant
# limits (docs/OPERATORS.md) would turn most of that traffic into `rate_limited` answers, so their
# servers run with every limit off (0 = unlimited).
UNLIMITED_TENANTS: dict[str, str] = {
    "TENANT_MESSAGES_PER_MINUTE": "0",
    "AGENT_MESSAGES_PER_MINUTE": "0",
    "TENANT_CONNECTIONS": "0",
    "TENANT_TOKENS_PER_DAY": "0",
    "TENANT_REQUESTS_PER_MINUTE": "0",
}
