"""Server subprocesses for tests and benchmarks: start on a free port, wait until ready, stop cleanly.

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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


def log_tail(path: StrPath, chars: int = 6000) -> str:
    """The end of a log, for error messages and test reports; a missing log is said, not raised."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def spawn(
    cmd: Sequence[str], *, env: Env, log_path: StrPath, cwd: StrPath | None = None, mode: str = "ab"
) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr in `log_path` (appended by default: a restart keeps the
    earlier output). The parent's handle is closed at once; the child has its own."""
    with open(log_path, mode) as log:
        return subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603


def wait_ready(
    probe: Callable[[], bool],
    proc: subprocess.Popen,
    timeout: float = 30.0,
    *,
    what: str,
    name: str = "server",
    log_path: StrPath | None = None,
    interval: float = 0.1,
) -> None:
    """Call `probe` until true; ServerNotReady if `proc` exits first (checked before every probe, so a
    crash fails at once) or `timeout` passes (<= 0: one check). With `log_path` the message ends with
    the log's tail, so a failed start explains itself."""
    deadline = time.monotonic() + timeout
    tail = (lambda: f":\n{log_tail(log_path)}") if log_path is not None else (lambda: "")
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
) -> None:
    """`wait_ready` until GET `url` returns a status that `ok` accepts (default: any below 500)."""

    def probe() -> bool:
        try:
            return ok(httpx.get(url, timeout=probe_timeout).status_code)
        except httpx.HTTPError:
            return False

    wait_ready(probe, proc, timeout, what=url, name=name, log_path=log_path, interval=interval)


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
