"""Redis for the scale-out tests: the machine's server (MAITENANT_TEST_REDIS_URL, default
redis://127.0.0.1:6379/0, which .ci/run starts), a channel prefix of their own per test so runs sharing
that server never hear each other, and a private throw-away `redis-server` for outage tests.

Without a reachable server the tests that need one are skipped with the reason, except with CI=true,
where they fail (as the PostgreSQL legs do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
import redis

from testsupport.servers import free_port, stop_process

TEST_REDIS_URL = os.environ.get("MAITENANT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_unavailable(url: str = TEST_REDIS_URL) -> str | None:
    """Why Redis at `url` cannot be used (None: it answers PING)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_redis() -> str:
    """The test Redis URL; skips (fails with CI=true) when it does not answer."""
    reason = redis_unavailable()
    if reason:
        message = f"needs Redis at MAITENANT_TEST_REDIS_URL ({TEST_REDIS_URL}): {reason}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return TEST_REDIS_URL


def unique_prefix() -> str:
    """A REDIS_PREFIX no other test or run uses."""
    return f"mt-test-{uuid.uuid4().hex[:12]}"


class PrivateRedis:
    """A `redis-server` of its own on a free loopback port, nothing on disk: stopped and started again
    to make an outage."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", self.dir]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + 10
        while redis_unavailable(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
            self.process = None
