"""Developer operations (invoke). Test environments live in noxfile.py.

invoke start-servers [--detach] [--database-url URL] [--configurator-port 8000] [--replier-port 8095]
invoke start-cluster --replicas N [--detach] [--database-url URL] [--redis-url URL]  (README "Scaling out")
invoke status | stop-servers | db-upgrade | cleanup --prefix RUN_ID [--force] | cleanup --tenant T
invoke integration [--users 3 --agents 2 --messages 5] | load
invoke create-operator --username U [--remove]
invoke tenant-limits --tenant T [--messages-per-minute N --agent-messages-per-minute N --connections N
                                 --tokens-per-day N --requests-per-minute N]  (N or "default")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from invoke import Context, Exit, task

from testsupport.servers import ServerNotReady, ServerProcess, port_free, stop_pid, stop_processes

ROOT = Path(__file__).parent
DEFAULT_RUN_DIR = ROOT / "run"
SERVERS = ("configurator", "replier")


def _database_url(database_url: str | None) -> str:
    from isolation.config import get_base_settings

    return database_url or get_base_settings().database_url


def _state_file(run_dir: Path) -> Path:
    return run_dir / "servers.json"


def _read_state(run_dir: Path) -> dict:
    path = _state_file(run_dir)
    return json.loads(path.read_text()) if path.exists() else {}


@task(help={"database-url": "defaults to DATABASE_URL or sqlite:///data/maitenant.db"})
def db_upgrade(c: Context, database_url: str | None = None) -> None:
    """Apply pending schema migrations (safe to re-run)."""
    from isolation import migrate

    url = _database_url(database_url)
    applied = migrate.upgrade(url)
    print(
        f"{migrate.describe(url)}: schema at version {migrate.LATEST_VERSION} "
        f"(applied: {', '.join(map(str, applied)) if applied else 'nothing to do'})"
    )


@task(
    help={
        "database-url": "defaults to DATABASE_URL or sqlite:///data/maitenant.db",
        "configurator-port": "HTTP port of the configurator API (default 8000)",
        "replier-port": "port of the replier (Socket.IO path /ws, default 8095)",
        "host": "interface to bind (default 127.0.0.1)",
        "detach": "return once both are healthy; pid files and logs go to --run-dir",
        "run-dir": "where --detach writes pid files and logs (default ./run)",
        "timeout": "seconds to wait for both /health endpoints",
        "upgrade": "run db-upgrade first (default); --no-upgrade when migrations run separately as the owner",
    }
)
def start_servers(
    c: Context,
    database_url: str | None = None,
    configurator_port: int = 8000,
    replier_port: int = 8095,
    host: str = "127.0.0.1",
    detach: bool = False,
    run_dir: str | None = None,
    timeout: float = 30.0,
    upgrade: bool = True,
) -> None:
    """Upgrade the database, then run the configurator and the replier (Ctrl-C stops both)."""
    url = _database_url(database_url)
    folder = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    ports = {"configurator": configurator_port, "replier": replier_port}
    for name, port in ports.items():
        if not port_free(host, port):
            raise Exit(
                f"error: port {port} on {host} ({name}) is already in use. Stop whatever holds it "
                f"(`invoke stop-servers` if it is MaiTenant) or pass --{name}-port.",
                code=1,
            )
    if upgrade:
        try:
            db_upgrade(c, database_url=url)
        except Exception as exc:  # shown to the user with what to do, not as a traceback
            raise Exit(
                f"error: db-upgrade failed: {exc}\nMigrations need the schema owner: run "
                "`invoke db-upgrade --database-url OWNER_URL`, then start with --no-upgrade "
                "(and DATABASE_APP_ROLE set to the application role).",
                code=1,
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    urls = {name: f"http://{host}:{port}" for name, port in ports.items()}
    servers = {
        name: ServerProcess(
            name,
            [sys.executable, "-m", name],
            env={**os.environ, "HOST": host, "PORT": str(ports[name]), "DATABASE_URL": url},
            log_path=folder / f"{name}.log" if detach else None,
            health_url=f"{urls[name]}/health",
            cwd=ROOT,
            # Own session: a terminal's Ctrl-C reaches only this task, which forwards exactly one
            # SIGINT (a second one makes uvicorn abandon its graceful shutdown).
            new_session=True,
        )
        for name in SERVERS
    }
    for server in servers.values():
        server.start()
    processes = {name: server.process for name, server in servers.items()}
    try:
        deadline = time.monotonic() + timeout
        pending = []
        for name, server in servers.items():  # one shared deadline; once passed, the rest get one check
            try:
                server.wait_healthy(deadline - time.monotonic())
            except ServerNotReady as exc:
                if exc.returncode is not None:
                    raise Exit(f"error: {name} exited with code {exc.returncode} while starting", code=1) from None
                pending.append(name)
        if pending:
            raise Exit(f"error: {', '.join(sorted(pending))} not healthy after {timeout:.0f} s", code=1)
    except BaseException:
        stop_processes(list(processes.values()), signal.SIGINT, timeout=10)
        raise
    elapsed = time.monotonic() - started
    print(f"configurator  {urls['configurator']}  (API /api/v1, docs {urls['configurator']}/docs)")
    print(f"replier       ws://{host}:{replier_port}/ws  (health {urls['replier']}/health, metrics /metrics)")
    print(f"database      {url if '@' not in url else url.split('@', 1)[-1]}")
    print(f"ready in {elapsed:.1f} s")
    if detach:
        state = {
            name: {"pid": processes[name].pid, "url": urls[name], "log": str(folder / f"{name}.log")}
            for name in SERVERS
        }
        _state_file(folder).write_text(json.dumps(state, indent=2))
        for name in SERVERS:
            (folder / f"{name}.pid").write_text(str(processes[name].pid))
        print(f"detached; logs and pid files in {folder}. Stop with `invoke stop-servers`.")
        return
    print("press Ctrl-C to stop both")

    def _terminate(signum, frame):  # SIGTERM to this task stops the servers too, never orphans them
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        died = [n for n, p in processes.items() if p.poll() is not None]
        print(f"{', '.join(died)} stopped; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping…")
    finally:
        stop_processes(list(processes.values()), signal.SIGINT, timeout=15)


@task(
    help={
        "replicas": "repliers behind the balancer, and configurator workers unless --workers (default 2)",
        "workers": "configurator uvicorn workers (default: --replicas)",
        "database-url": "defaults to DATABASE_URL or sqlite:///data/maitenant.db (use PostgreSQL for a cluster)",
        "redis-url": "defaults to REDIS_URL or redis://127.0.0.1:6379/0",
        "configurator-port": "public port of the configurator on the balancer (default 8000)",
        "replier-port": "public port of the repliers on the balancer (Socket.IO path /ws, default 8095)",
        "host": "interface the balancer binds (default 127.0.0.1); the backends always listen on loopback",
        "detach": "return once everything is healthy; pid files, logs and haproxy.cfg go to --run-dir",
        "run-dir": "where the rendered haproxy.cfg, logs and (with --detach) pid files go (default ./run)",
        "timeout": "seconds to wait for every /health",
        "upgrade": "run db-upgrade first (default); --no-upgrade when migrations run separately as the owner",
    }
)
def start_cluster(
    c: Context,
    replicas: int = 2,
    workers: int = 0,
    database_url: str | None = None,
    redis_url: str | None = None,
    configurator_port: int = 8000,
    replier_port: int = 8095,
    host: str = "127.0.0.1",
    detach: bool = False,
    run_dir: str | None = None,
    timeout: float = 60.0,
    upgrade: bool = True,
) -> None:
    """N repliers and an N-worker configurator behind HAProxy, sharing Redis and the database."""
    from testsupport.cluster import Cluster, ClusterError, check_requirements

    if replicas < 1:
        raise Exit("error: --replicas must be at least 1", code=1)
    url = _database_url(database_url)
    redis = redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        check_requirements(redis)
    except ClusterError as exc:
        raise Exit(f"error: {exc}", code=1) from None
    if url.startswith("sqlite"):
        print("warning: a cluster on SQLite works on one host only; use PostgreSQL (--database-url) to scale out")
    if upgrade:
        try:
            db_upgrade(c, database_url=url)
        except Exception as exc:
            raise Exit(f"error: db-upgrade failed: {exc}", code=1) from None
    folder = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    cluster = Cluster(
        database_url=url,
        redis_url=redis,
        run_dir=folder,
        replicas=replicas,
        configurator_workers=workers or None,
        host=host,
        replier_port=replier_port,
        configurator_port=configurator_port,
        redis_prefix=os.environ.get("REDIS_PREFIX", "maitenant"),
        new_session=True,
    )
    started = time.monotonic()
    try:
        cluster.start(timeout)
    except ClusterError as exc:
        raise Exit(f"error: {exc}", code=1) from None
    except ServerNotReady as exc:
        raise Exit(f"error: {str(exc).splitlines()[0]} (logs in {folder})", code=1) from None
    print(f"configurator  {cluster.configurator_url}  ({cluster.workers} workers behind HAProxy)")
    print(f"replier       {cluster.replier_url}  ({replicas} repliers behind HAProxy: {', '.join(cluster.names)})")
    print(f"balancer      {cluster.haproxy_cfg}")
    print(f"ready in {time.monotonic() - started:.1f} s")
    if detach:
        state = {
            "balancer": {"pid": cluster.balancer.process.pid, "url": cluster.replier_http, "log": "haproxy.log"},
            "configurator": {"pid": cluster.configurator.process.pid, "url": cluster.configurator_url},
            **{
                f"replier-{name}": {"pid": server.process.pid, "url": cluster.instance_http(i)}
                for i, (name, server) in enumerate(zip(cluster.names, cluster.repliers, strict=True))
            },
        }
        _state_file(folder).write_text(json.dumps(state, indent=2))
        print(f"detached; logs in {folder}. Stop with `invoke stop-servers`.")
        return
    print("press Ctrl-C to stop everything")

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while len(cluster.processes()) == replicas + 2:
            time.sleep(0.5)
        print("a process of the cluster stopped; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping…")
    finally:
        cluster.stop()


@task(help={"run-dir": "the folder `start-servers --detach` or `start-cluster --detach` wrote to (default ./run)"})
def stop_servers(c: Context, run_dir: str | None = None) -> None:
    """Stop servers started with `start-servers --detach` or `start-cluster --detach` (graceful, then
    forced after 15 s); a cluster's balancer goes first."""
    folder = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    state = _read_state(folder)
    if not state:
        print(f"no detached servers recorded in {folder}")
        return
    for name, info in state.items():
        pid = int(info["pid"])
        sig = signal.SIGTERM if name == "balancer" else signal.SIGINT  # HAProxy stops at once on SIGTERM
        print(f"{name}: {stop_pid(pid, sig, timeout=15)} (pid {pid})")
    for path in [_state_file(folder), *(folder / f"{n}.pid" for n in SERVERS)]:
        path.unlink(missing_ok=True)


@task(
    help={
        "run-dir": "the folder `start-servers --detach` wrote to (default ./run)",
        "configurator-url": "default http://127.0.0.1:8000 (or the detached run's)",
        "replier-url": "default http://127.0.0.1:8095 (or the detached run's)",
    }
)
def status(c: Context, run_dir: str | None = None, configurator_url: str | None = None, replier_url: str | None = None):
    """Health of both backends (of every process of a detached cluster); exits non-zero when one is down."""
    state = _read_state(Path(run_dir) if run_dir else DEFAULT_RUN_DIR)
    urls = {
        "configurator": configurator_url or state.get("configurator", {}).get("url", "http://127.0.0.1:8000"),
        "replier": replier_url or state.get("replier", {}).get("url", "http://127.0.0.1:8095"),
    }
    if "balancer" in state:  # a cluster: the public addresses, then each replier on its own
        urls = {"replier (balancer)": replier_url or state["balancer"]["url"], "configurator": urls["configurator"]}
        urls.update({name: info["url"] for name, info in state.items() if name.startswith("replier-")})
    down = []
    for name, url in urls.items():
        try:
            response = httpx.get(f"{url}/health", timeout=2.0)
            ok = response.status_code == 200
            detail = response.text.strip()[:200]
        except httpx.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        print(f"{name:18s} {url:28s} {'up' if ok else 'DOWN'}  {detail}")
        if not ok:
            down.append(name)
    if down:
        raise Exit(code=1)


def _signal_tenants(tenant_ids: list[str]) -> None:
    """With REDIS_URL, tell every replier that these tenants changed (isolation/signals.py), as the
    configurator does for the same change through the API; without it, repliers see it at their
    periodic check."""
    from isolation.config import get_base_settings
    from isolation.signals import RedisPublisher, Signal

    settings = get_base_settings()
    if not settings.redis_url:
        return
    signals = RedisPublisher(settings.redis_url, settings.redis_prefix)
    for tenant_id in tenant_ids:
        signals.publish(Signal("tenant", tenant_id))
    signals.close()


@task(
    help={
        "prefix": "delete the accounts whose username starts with PREFIX (a run id such as "
        "it_20261122031425_532a26_) and the tenants they alone belong to; tenant names are never matched",
        "force": "allow a --prefix shorter than a run id (it may match other runs' or real users' accounts)",
        "tenant": "delete this tenant id and all its data",
        "database-url": "defaults to DATABASE_URL or sqlite:///data/maitenant.db",
    }
)
def cleanup(
    c: Context,
    prefix: str | None = None,
    tenant: str | None = None,
    database_url: str | None = None,
    force: bool = False,
):
    """Delete test data; prints rows deleted per table.

    `--prefix` matches account usernames only: a tenant with a member outside the matched accounts
    is never deleted (only the matched accounts' memberships in it are removed), and an account that
    is the only owner of such a tenant is kept and listed.
    """
    from rich.console import Console
    from rich.table import Table

    from isolation import cleanup as isolation_cleanup
    from isolation import db as isolation_db
    from isolation.migrate import check_schema

    if (prefix is None) == (tenant is None):
        raise Exit("error: give exactly one of --prefix or --tenant", code=2)
    if prefix is not None:
        try:
            isolation_cleanup.check_prefix(prefix, force=force)
        except ValueError as exc:
            raise Exit(f"error: {exc}", code=2) from None
    database = isolation_db.configure(_database_url(database_url))
    check_schema(database)
    if prefix is not None:
        counts = isolation_cleanup.delete_by_prefix(prefix, force=force)
        left = [a["username"] for a in isolation_cleanup.accounts_with_prefix(prefix)]
    else:
        counts, left = isolation_cleanup.delete_tenant(tenant), []
        _signal_tenants([tenant])  # its replier connections close at once (their keys are gone)
    table = Table(title=f"rows deleted ({'prefix ' + prefix if prefix is not None else 'tenant ' + tenant})")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, count in sorted(counts.items()):
        table.add_row(name, str(count))
    table.add_row("total", str(sum(counts.values())), style="bold")
    Console().print(table)
    if left:
        raise Exit(f"accounts left (the only owners of tenants with other members): {left}", code=1)


@task(
    help={
        "username": "the account to mark (it must exist: register it first)",
        "remove": "take the operator mark away instead",
        "database-url": "the schema owner's URL (defaults to DATABASE_URL or sqlite:///data/maitenant.db)",
    }
)
def create_operator(c: Context, username: str, remove: bool = False, database_url: str | None = None) -> None:
    """Mark an account as an operator (the /api/v1/operator routes); runs as the URL's role, which on
    PostgreSQL must be the schema owner (the application role may not write the mark)."""
    from isolation.errors import NotFound
    from isolation.operators import set_operator

    try:
        account = set_operator(_database_url(database_url), username, not remove)
    except NotFound:
        raise Exit(f"error: no account named {username!r}", code=1) from None
    state = "is now an operator" if account["is_operator"] else "is no longer an operator"
    print(f"account {account['username']} ({account['id']}) {state}")


def _limit_option(name: str, value: str | None) -> int | None:
    """A --<limit> option: a number (0 = unlimited) or "default" (the override is removed)."""
    if value is None or value == "default":
        return None
    try:
        number = int(value)
    except ValueError:
        raise Exit(f"error: --{name.replace('_', '-')} must be a number or 'default', not {value!r}", code=2) from None
    if number < 0:
        raise Exit(f"error: --{name.replace('_', '-')} must be 0 (unlimited) or more", code=2)
    return number


@task(
    help={
        "tenant": "the tenant id",
        "messages-per-minute": "chat messages per window for the whole tenant (N, 0 = unlimited, or 'default')",
        "agent-messages-per-minute": "chat messages per window for each agent",
        "connections": "open replier connections",
        "tokens-per-day": "LLM tokens per budget day",
        "requests-per-minute": "configurator API requests per window",
        "database-url": "defaults to DATABASE_URL or sqlite:///data/maitenant.db",
    }
)
def tenant_limits(
    c: Context,
    tenant: str,
    messages_per_minute: str | None = None,
    agent_messages_per_minute: str | None = None,
    connections: str | None = None,
    tokens_per_day: str | None = None,
    requests_per_minute: str | None = None,
    database_url: str | None = None,
) -> None:
    """Set a tenant's limit overrides (only the options given change) and print its effective limits.

    Configurators apply a change at the next request; running repliers at once with REDIS_URL (a
    "tenant" change signal), else within LIMITS_REFRESH_SECONDS."""
    from isolation import IsolationContext, NotFound, Scoped
    from isolation import db as isolation_db
    from isolation.config import get_base_settings
    from isolation.context import is_id
    from isolation.limits import LIMIT_NAMES, defaults, effective
    from isolation.migrate import check_schema

    given = {
        "messages_per_minute": messages_per_minute,
        "agent_messages_per_minute": agent_messages_per_minute,
        "connections": connections,
        "tokens_per_day": tokens_per_day,
        "requests_per_minute": requests_per_minute,
    }
    changes = {name: _limit_option(name, value) for name, value in given.items() if value is not None}
    check_schema(isolation_db.configure(_database_url(database_url)))
    manager = Scoped(IsolationContext(tenant)).tenant if is_id(tenant) else None
    try:
        if manager is None:
            raise NotFound("tenant")
        overrides = manager.set_limits(changes) if changes else manager.limit_overrides()
    except NotFound:
        raise Exit(f"error: no tenant {tenant!r}", code=1) from None
    finally:
        isolation_db.close_database()
    settings = get_base_settings()
    if changes:
        _signal_tenants([tenant])
    limits, base = effective(overrides, settings).as_dict(), defaults(settings)
    print(f"tenant {tenant}: effective limits (0 = unlimited)")
    for name in LIMIT_NAMES:
        source = f"override; default {base[name]}" if overrides[name] is not None else "default"
        print(f"  {name:27s} {limits[name]:>12d}  ({source})")


@task(
    help={
        "users": "users to register",
        "agents": "agents per user",
        "messages": "messages per conversation",
        "configurator-url": "default http://127.0.0.1:8000",
        "replier-url": "default ws://127.0.0.1:8095/ws",
        "report": "write the JSON report here",
    }
)
def integration(
    c: Context,
    users: int = 3,
    agents: int = 2,
    messages: int = 5,
    configurator_url: str = "http://127.0.0.1:8000",
    replier_url: str = "ws://127.0.0.1:8095/ws",
    report: str | None = None,
) -> None:
    """Run the end-to-end CLI against servers that are already running (`invoke start-servers`)."""
    args = [
        sys.executable, "-m", "integration_tests",
        "--users", str(users), "--agents", str(agents), "--messages", str(messages),
        "--configurator-url", configurator_url, "--replier-url", replier_url,
    ]  # fmt: skip
    if report:
        args += ["--report", report]
    raise Exit(code=subprocess.call(args, cwd=ROOT))


@task(help={"args": 'options for perf/load_run.py, e.g. "--database postgresql --users 50 --max-p95-ms 500"'})
def load(c: Context, args: str = "") -> None:
    """Headless locust runs against freshly started backends (`nox -s load`, options passed through)."""
    c.run(f"nox -s load -- {args}" if args else "nox -s load", pty=False)
