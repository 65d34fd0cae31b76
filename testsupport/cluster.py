"""A whole scale-out deployment on one machine: N repliers, the configurator with N uvicorn workers,
HAProxy in front (deploy/haproxy.cfg.template), all sharing one database and one Redis.

Used by `invoke start-cluster` (tasks.py), the cluster tests (cluster_tests/) and the benchmark, so
what the tests prove is what the command runs. Every server listens on loopback; the balancer's
two public addresses are `replier_url` and `configurator_url`.
"""

from __future__ import annotations

import os
import shutil
import signal
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from testsupport.redis_server import redis_unavailable
from testsupport.servers import ServerProcess, free_port, port_free, stop_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "haproxy.cfg.template"
HAPROXY_INSTALL = "apt-get install -y haproxy"
REDIS_INSTALL = "apt-get install -y redis-server (then: redis-server --daemonize yes)"


class ClusterError(RuntimeError):
    """Something the cluster needs is missing (the message says what to install or run)."""


def check_requirements(redis_url: str) -> str:
    """The haproxy binary's path; ClusterError with the install command when it or Redis is missing."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise ClusterError(f"haproxy is not installed: {HAPROXY_INSTALL}")
    reason = redis_unavailable(redis_url)
    if reason:
        raise ClusterError(f"Redis does not answer at REDIS_URL ({reason}): {REDIS_INSTALL}")
    return haproxy


def render_haproxy(
    *,
    replier_port: int,
    configurator_port: int,
    repliers: list[tuple[str, int]],
    configurators: list[tuple[str, int]],
    bind_host: str = "127.0.0.1",
    backend_host: str = "127.0.0.1",
    maxconn: int = 8_000,  # HAProxy needs about 2 descriptors per connection (ulimit -n)
) -> str:
    """deploy/haproxy.cfg.template filled in: `repliers` are (INSTANCE_NAME, port) pairs."""
    rules = "\n".join(f"    use-server {name} if {{ url_param(sid) -m beg {name}. }}" for name, _ in repliers)
    servers = "\n".join(f"    server {name} {backend_host}:{port} check" for name, port in repliers)
    configurator_servers = "\n".join(f"    server {name} {backend_host}:{port} check" for name, port in configurators)
    return string.Template(TEMPLATE.read_text()).substitute(
        maxconn=maxconn,
        bind_host=bind_host,
        replier_port=replier_port,
        configurator_port=configurator_port,
        replier_rules=rules,
        replier_servers=servers,
        configurator_servers=configurator_servers,
    )


@dataclass
class Cluster:
    """The processes of one deployment; `start()` waits until the balancer answers for both."""

    database_url: str
    redis_url: str
    run_dir: Path
    replicas: int = 2
    configurator_workers: int | None = None  # default: `replicas`
    host: str = "127.0.0.1"
    replier_port: int = 0  # 0: a free port
    configurator_port: int = 0
    redis_prefix: str = "maitenant"
    env: dict[str, str] = field(default_factory=dict)  # extra settings for every backend
    new_session: bool = False
    repliers: list[ServerProcess] = field(default_factory=list)
    configurator: ServerProcess | None = None
    balancer: ServerProcess | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.replier_port = self.replier_port or free_port()
        self.configurator_port = self.configurator_port or free_port()
        self.workers = self.configurator_workers or self.replicas
        self.names = [f"r{i + 1}" for i in range(self.replicas)]
        self.internal_ports = [free_port() for _ in range(self.replicas)]
        self.configurator_internal = free_port()

    @property
    def replier_url(self) -> str:
        return f"ws://{self.host}:{self.replier_port}/ws"

    @property
    def replier_http(self) -> str:
        return f"http://{self.host}:{self.replier_port}"

    @property
    def configurator_url(self) -> str:
        return f"http://{self.host}:{self.configurator_port}"

    def instance_http(self, index: int) -> str:
        """One replier's own address (not through the balancer)."""
        return f"http://127.0.0.1:{self.internal_ports[index]}"

    @property
    def haproxy_cfg(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    def _backend_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            REDIS_PREFIX=self.redis_prefix,
            HOST="127.0.0.1",
            FORWARDED_ALLOW_IPS="127.0.0.1",  # the balancer (deploy/haproxy.cfg.template: option forwardfor)
        )
        env.update(self.env)
        env.update(extra)
        return env

    def start(self, timeout: float = 60.0) -> Cluster:
        haproxy = check_requirements(self.redis_url)
        for what, port in (("replier", self.replier_port), ("configurator", self.configurator_port)):
            if not port_free(self.host, port):
                raise ClusterError(f"port {port} on {self.host} ({what}) is already in use")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.haproxy_cfg.write_text(
            render_haproxy(
                replier_port=self.replier_port,
                configurator_port=self.configurator_port,
                repliers=list(zip(self.names, self.internal_ports, strict=True)),
                configurators=[("c1", self.configurator_internal)],
                bind_host=self.host,
            )
        )
        for name, port in zip(self.names, self.internal_ports, strict=True):
            self.repliers.append(
                ServerProcess(
                    f"replier {name}",
                    [sys.executable, "-m", "replier"],
                    env=self._backend_env(PORT=str(port), INSTANCE_NAME=name),
                    log_path=self.run_dir / f"replier-{name}.log",
                    health_url=f"http://127.0.0.1:{port}/health",
                    cwd=ROOT,
                    new_session=self.new_session,
                )
            )
        self.configurator = ServerProcess(
            "configurator",
            [sys.executable, "-m", "configurator"],
            env=self._backend_env(PORT=str(self.configurator_internal), WORKERS=str(self.workers)),
            log_path=self.run_dir / "configurator.log",
            health_url=f"http://127.0.0.1:{self.configurator_internal}/health",
            cwd=ROOT,
            new_session=self.new_session,
        )
        self.balancer = ServerProcess(
            "haproxy",
            [haproxy, "-db", "-f", str(self.haproxy_cfg)],
            env=dict(os.environ),
            log_path=self.run_dir / "haproxy.log",
            health_url=f"{self.replier_http}/health",
            cwd=ROOT,
            new_session=self.new_session,
        )
        try:
            for server in [*self.repliers, self.configurator]:
                server.start()
            for server in [*self.repliers, self.configurator]:
                server.wait_healthy(timeout, interval=0.1)
            self.balancer.start()
            self.balancer.wait_healthy(timeout, interval=0.1)
            # Every replier must be up in HAProxy's eyes before clients are spread over them.
            wait_ready(
                self._all_in_rotation, self.balancer.process, timeout, what="every replier in rotation", name="haproxy"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _all_in_rotation(self) -> bool:
        """Whether consecutive handshakes through the balancer reach every replier."""
        import httpx

        seen = set()
        for _ in range(self.replicas * 4):
            try:
                response = httpx.get(f"{self.replier_http}/ws/?EIO=4&transport=polling", timeout=2)
            except httpx.HTTPError:
                return False
            if response.status_code == 200 and '"sid":"' in response.text:
                seen.add(response.text.split('"sid":"', 1)[1].split(".", 1)[0])
        return seen == set(self.names)

    def processes(self) -> dict[str, int]:
        """Name -> pid of every running process (for `invoke stop-servers` after `--detach`)."""
        found = {}
        for server in [*self.repliers, self.configurator, self.balancer]:
            if server is not None and server.process is not None and server.process.poll() is None:
                found[server.name] = server.process.pid
        return found

    def stop(self) -> None:
        """The balancer first (no new requests), then the backends, gracefully."""
        if self.balancer is not None and self.balancer.process is not None:
            stop_process(self.balancer.process, signal.SIGTERM, timeout=5)
        for server in [*self.repliers, self.configurator]:
            if server is not None and server.process is not None:
                server.stop(timeout=15)
