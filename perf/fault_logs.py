"""How much both backends log, and what their /health says, during a database fault under load
(a script, not a test).

Starts the configurator and the replier on a throw-away database, then for `--seconds`, while `--rate`
REST requests a second (authenticated agent creations) and `--chat-rate` chat messages a second hit
them, injects `--fault`:

* `outage` (default): the database is unavailable (PostgreSQL: connections refused and terminated;
  SQLite: another process holds the write lock);
* `disk-full` (SQLite only: PostgreSQL's disk is the server's, not ours): the database file lives on a
  small tmpfs (`--disk-mib`, needs root) that is filled up; the servers get `HEALTH_MIN_FREE_MB=1` so
  the newer disk check does not fail on the small tmpfs before the fill (an older tree ignores it).

It prints per backend: bytes and lines logged during the fault, tracebacks, what the clients got
(HTTP status codes, chat error codes), what `GET /health` answered, sampled every 0.5 s during the
fault (status codes, and each distinct `checks` object, or for a body without one its JSON minus the
numeric counters: a health check that says 200 while every write fails is the problem measured), and
whether the backends recovered once the fault ended (one REST request and one chat message). The
per-tenant limits are off (`testsupport.servers.UNLIMITED_TENANTS`), so the answers are the fault's.

    python -m perf.fault_logs --database postgresql --seconds 30 --rate 100 --chat-rate 100
    python -m perf.fault_logs --fault disk-full --database sqlite --seconds 30 --rate 100 --chat-rate 100
    python -m perf.fault_logs --code-dir /tmp/before ...   # the same run against another checkout

`--code-dir` runs the servers from another source tree (e.g. `git archive <commit> | tar -x -C DIR`)
with this interpreter, so "before" and "after" are measured by the same run. The database is
provisioned with that tree's own `testsupport` and `isolation` (put first on the import path): an
older server refuses a schema newer than it knows. The fault helpers (`testsupport/faults.py`) always
come from this checkout, loaded by file path: older trees do not have them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from perf.backends import register, server_env
from perf.sio_loadgen import envelope, open_socket

HERE = Path(__file__).resolve().parent.parent  # this checkout: the fault helpers always come from here
SECRET_KEY = "fault-logs-secret-key-0123456789abcdef"  # noqa: S105 - a throw-away database's
HEALTH_EVERY = 0.5  # seconds between two /health samples of a backend
RECOVERY_WAIT = 15.0  # seconds the recovery chat message may take to be answered


def _harness(name: str) -> ModuleType:
    """`testsupport/<name>.py` of this checkout, loaded by file path: `faults` (older trees lack it; its
    own imports, `testsupport.databases` and `isolation.db`, resolve to the code dir's tree, which has
    what it uses) and `servers` (the process harness: no project imports, and the same for both runs)."""
    spec = importlib.util.spec_from_file_location(f"fault_logs_{name}", HERE / f"testsupport/{name}.py")
    assert spec is not None and spec.loader is not None
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _env(database, port: int, code_dir: Path, **extra: str) -> dict[str, str]:
    return server_env(database, port, code_dir, secret_key=SECRET_KEY, log_level="info", **extra)


def _start(servers: ModuleType, name: str, module: str, env: dict, log: Path, code_dir: Path) -> Any:
    server = servers.ServerProcess(
        name,
        [sys.executable, "-m", module],
        env=env,
        log_path=log,
        health_url=f"http://127.0.0.1:{env['PORT']}/health",
        cwd=code_dir,
    )
    server.start()
    server.wait_healthy(60)
    return server


async def _rest_load(base: str, token: str, rate: float, seconds: float, counts: collections.Counter) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def one(n: int) -> None:
            try:
                response = await http.post("/api/v1/agents", json={"name": f"fault-{n}"}, headers=headers)
                code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
                counts[f"{response.status_code} {code}".strip()] += 1
            except Exception as exc:  # a client-side timeout or reset counts too
                counts[type(exc).__name__] += 1

        tasks = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)


async def _chat_load(ws, key: str, rate: float, seconds: float, counts: collections.Counter) -> None:
    async def read() -> None:
        async for packet in ws:
            if packet == "2":
                await ws.send("3")
            elif packet.startswith("42"):
                event = json.loads(packet[2:])[1]
                kind = event.get("type")
                if kind == "custom_error":
                    counts[f"error {event['payload']['code']}"] += 1
                elif kind == "sys_std":
                    counts["reply"] += 1

    reader = asyncio.create_task(read())
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        await ws.send(envelope(key, "qq", f"fault-user-{n % 20}", n, f"message {n}"))
        n += 1
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
    await asyncio.sleep(3)  # the last answers
    reader.cancel()
    await ws.close()


def _health_body(response: httpx.Response) -> str:
    """What a /health answer says: its `checks`, else its JSON without numbers (counters), else text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "checks" in body:
        return json.dumps(body["checks"], sort_keys=True)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    return json.dumps(body, sort_keys=True)


async def _sample_health(
    url: str, stop: asyncio.Event, codes: collections.Counter, bodies: collections.Counter
) -> None:
    """GET `url` every HEALTH_EVERY seconds until `stop` is set; counts status codes and bodies."""
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await http.get(url)
                codes[str(response.status_code)] += 1
                bodies[_health_body(response)] += 1
            except Exception as exc:  # a timeout is an answer too
                codes[type(exc).__name__] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, started + HEALTH_EVERY - time.monotonic()))


async def _recovered_chat(url: str, key: str) -> str:
    """One chat message on a new connection after the fault: its first answer ("reply", "error <code>")."""
    try:
        ws = await open_socket(url, {"x-apikey": key, "x-platform": "qq"})
    except Exception as exc:
        return f"connect failed: {type(exc).__name__}: {exc}"[:200]
    try:
        await ws.send(envelope(key, "qq", "fault-recovery", 0, "after the fault"))
        async with asyncio.timeout(RECOVERY_WAIT):
            async for packet in ws:
                if packet == "2":
                    await ws.send("3")
                elif packet.startswith("42"):
                    event = json.loads(packet[2:])[1]
                    if event.get("type") == "custom_error":
                        return f"error {event['payload']['code']}"
                    if event.get("type") == "sys_std":
                        return "reply"
        return "connection closed"
    except TimeoutError:
        return f"no answer in {RECOVERY_WAIT:g}s"
    finally:
        await ws.close()


def _recovered_rest(base: str, token: str) -> str:
    """One agent creation after the fault: "<status> <error code>"."""
    try:
        response = httpx.post(
            f"{base}/api/v1/agents",
            json={"name": "fault-recovery"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except Exception as exc:
        return type(exc).__name__
    code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
    return f"{response.status_code} {code}".strip()


@contextlib.contextmanager
def _database(args: argparse.Namespace, folder: Path, faults: ModuleType) -> Iterator[tuple[Any, Path | None]]:
    """The run's database (the code dir's schema) and, for `disk-full`, the tmpfs folder it lives on."""
    if args.fault == "outage":
        from testsupport.databases import provision_database

        with provision_database(args.database) as database:
            yield database, None
        return
    from isolation.migrate import upgrade
    from testsupport.databases import ProvisionedDatabase

    with faults.small_tmpfs(folder / "disk", args.disk_mib * 1024 * 1024) as disk:
        url = f"sqlite:///{disk}/maitenant.db"
        upgrade(url)
        yield ProvisionedDatabase("sqlite", url, url, None), disk


@contextlib.contextmanager
def _fault(kind: str, database: Any, disk: Path | None, faults: ModuleType) -> Iterator[None]:
    """The database outage, or the disk under the database file full, while the block runs."""
    if kind == "outage":
        with faults.database_outage(database):
            yield
        return
    filler = faults.fill_disk(disk)
    try:
        yield
    finally:
        filler.unlink()


def _summary(log: Path, offset: int) -> dict:
    data = log.read_bytes()[offset:]
    text = data.decode("utf-8", "replace")
    return {
        "bytes": len(data),
        "lines": text.count("\n"),
        "tracebacks": text.count("Traceback (most recent call last)"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=("outage", "disk-full"), default="outage")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="REST requests per second")
    parser.add_argument("--chat-rate", type=float, default=100.0, help="chat messages per second")
    parser.add_argument("--code-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--busy-ms", default="200", help="SQLITE_BUSY_TIMEOUT_MS of the servers")
    parser.add_argument("--disk-mib", type=int, default=32, help="disk-full: size of the database's tmpfs")
    args = parser.parse_args(argv)
    if args.fault == "disk-full" and args.database != "sqlite":
        parser.error("--fault disk-full needs --database sqlite: PostgreSQL's disk is the server's, not this run's")
    code_dir = args.code_dir.resolve()
    sys.path.insert(0, str(code_dir))  # provisioning with the code dir's own schema (and its testsupport)
    faults = _harness("faults")
    folder = Path(tempfile.mkdtemp(prefix="fault-logs-"))
    try:
        with _database(args, folder, faults) as (database, disk):
            report = _run(args, code_dir, folder, database, disk, faults)
    except faults.TmpfsUnavailable as exc:
        print(f"fault_logs: no tmpfs for --fault disk-full: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"logs kept in {folder}", file=sys.stderr)
    return 0


def _run(
    args: argparse.Namespace, code_dir: Path, folder: Path, database: Any, disk: Path | None, faults: ModuleType
) -> dict:
    """Servers up, load and /health samples during the fault, recovery after it; the report."""
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db

    servers = _harness("servers")
    isolation_db.configure(database.url, app_role=database.app_role)
    account = system.create_account(f"fl{secrets.token_hex(4)}", f"fl{secrets.token_hex(4)}@example.com", "x")
    tenant = system.create_tenant("fault logs", account["id"])
    agent = Scoped(IsolationContext(tenant["id"])).agents.create(name="fl", persona={}, config={}, llm={})
    _, key = Scoped(IsolationContext(tenant["id"])).api_keys.create(agent["id"], name="fl")
    isolation_db.close_database()
    # Per-tenant limits off (as in the benchmarks; older trees have none): at these rates they would
    # answer most requests `rate_limited` and hide what the fault does.
    extra = {"SQLITE_BUSY_TIMEOUT_MS": args.busy_ms, **servers.UNLIMITED_TENANTS}
    if args.fault == "disk-full":
        extra["HEALTH_MIN_FREE_MB"] = "1"  # the tmpfs is small; the fill is what must fail the check
    cport, rport = servers.free_port(), servers.free_port()
    clog, rlog = folder / "configurator.log", folder / "replier.log"
    configurator = _start(
        servers, "configurator", "configurator", _env(database, cport, code_dir, **extra), clog, code_dir
    )
    try:
        replier = _start(servers, "replier", "replier", _env(database, rport, code_dir, **extra), rlog, code_dir)
    except BaseException:
        configurator.stop()
        raise
    try:
        base = f"http://127.0.0.1:{cport}"
        url = f"ws://127.0.0.1:{rport}/ws/?EIO=4&transport=websocket"
        token = register(base, "fl")
        rest: collections.Counter = collections.Counter()
        chat: collections.Counter = collections.Counter()
        health = {
            backend: {"codes": collections.Counter(), "bodies": collections.Counter()}
            for backend in ("configurator", "replier")
        }
        offsets = (clog.stat().st_size, rlog.stat().st_size)

        async def load() -> None:
            ws = await open_socket(url, {"x-apikey": key, "x-platform": "qq"})  # connected before the fault
            stop = asyncio.Event()
            with _fault(args.fault, database, disk, faults):
                samplers = [
                    asyncio.create_task(_sample_health(f"{b}/health", stop, **health[backend]))
                    for backend, b in (("configurator", base), ("replier", f"http://127.0.0.1:{rport}"))
                ]
                try:
                    await asyncio.gather(
                        _rest_load(base, token, args.rate, args.seconds, rest),
                        _chat_load(ws, key, args.chat_rate, args.seconds, chat),
                    )
                finally:
                    stop.set()
                    await asyncio.gather(*samplers)

        asyncio.run(load())
        fault_logs = (_summary(clog, offsets[0]), _summary(rlog, offsets[1]))
        recovery = {"rest": _recovered_rest(base, token), "chat": asyncio.run(_recovered_chat(url, key))}
    finally:
        configurator.stop()
        replier.stop()
    return {
        "fault": args.fault,
        "database": args.database,
        "code": str(code_dir),
        "seconds": args.seconds,
        "rest_rate": args.rate,
        "chat_rate": args.chat_rate,
        "configurator_log": fault_logs[0],
        "replier_log": fault_logs[1],
        "rest_answers": dict(rest),
        "chat_answers": dict(chat),
        "health_during_fault": {
            backend: {"codes": dict(seen["codes"]), "bodies": dict(seen["bodies"])} for backend, seen in health.items()
        },
        "recovery_after_fault": recovery,
    }


if __name__ == "__main__":
    sys.exit(main())
