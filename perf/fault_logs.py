"""How much both backends log during a database outage under load (a script, not a test).

Starts the configurator and the replier on a throw-away database, makes the database unavailable for
`--seconds` (PostgreSQL: connections refused and terminated; SQLite: another process holds the write
lock) while `--rate` REST requests a second (authenticated agent creations) and `--chat-rate` chat
messages a second hit them, then prints per backend: bytes and lines logged during the outage,
tracebacks, and what the clients got (HTTP status codes, chat error codes).

    python -m perf.fault_logs --database postgresql --seconds 30 --rate 100 --chat-rate 100
    python -m perf.fault_logs --code-dir /tmp/before ...   # the same run against another checkout

`--code-dir` runs the servers from another source tree (e.g. `git archive <commit> | tar -x -C DIR`)
with this interpreter, so "before" and "after" are measured by the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from perf.sio_loadgen import envelope, open_socket
from testsupport.databases import provision_database
from testsupport.faults import database_outage
from testsupport.servers import ServerProcess, free_port

PASSWORD = "fault-logs-password-0123"  # noqa: S105 - a throw-away account of the run


def _env(database, port: int, code_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "FORWARDED_ALLOW_IPS")}
    env.update(extra)
    env["DATABASE_URL"] = database.url
    env["HOST"], env["PORT"] = "127.0.0.1", str(port)
    env["SECRET_KEY"] = "fault-logs-secret-key-0123456789abcdef"  # noqa: S105 - a throw-away database's
    env["PASSWORD_HASH_TIME_COST"], env["PASSWORD_HASH_MEMORY_KIB"] = "1", "8192"  # cheap hashing
    env["LOG_LEVEL"], env["PYTHONPATH"] = "info", str(code_dir)
    if database.app_role:
        env["DATABASE_APP_ROLE"] = database.app_role
    return env


def _start(name: str, module: str, env: dict, log: Path, code_dir: Path) -> ServerProcess:
    server = ServerProcess(
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
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="REST requests per second")
    parser.add_argument("--chat-rate", type=float, default=100.0, help="chat messages per second")
    parser.add_argument("--code-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--busy-ms", default="200", help="SQLITE_BUSY_TIMEOUT_MS of the servers")
    args = parser.parse_args(argv)
    code_dir = args.code_dir.resolve()
    folder = Path(tempfile.mkdtemp(prefix="fault-logs-"))
    with provision_database(args.database) as database:
        from isolation import IsolationContext, Scoped, system
        from isolation import db as isolation_db

        isolation_db.configure(database.url, app_role=database.app_role)
        account = system.create_account(f"fl{secrets.token_hex(4)}", f"fl{secrets.token_hex(4)}@example.com", "x")
        tenant = system.create_tenant("fault logs", account["id"])
        agent = Scoped(IsolationContext(tenant["id"])).agents.create(name="fl", persona={}, config={}, llm={})
        _, key = Scoped(IsolationContext(tenant["id"])).api_keys.create(agent["id"], name="fl")
        isolation_db.close_database()
        extra = {"SQLITE_BUSY_TIMEOUT_MS": args.busy_ms}
        cport, rport = free_port(), free_port()
        clog, rlog = folder / "configurator.log", folder / "replier.log"
        configurator = _start("configurator", "configurator", _env(database, cport, code_dir, **extra), clog, code_dir)
        replier = _start("replier", "replier", _env(database, rport, code_dir, **extra), rlog, code_dir)
        try:
            base = f"http://127.0.0.1:{cport}"
            name = f"fl{secrets.token_hex(4)}"
            registered = httpx.post(
                f"{base}/api/v1/auth/register",
                json={"username": name, "email": f"{name}@example.com", "password": PASSWORD},
                timeout=30,
            )
            registered.raise_for_status()
            token = registered.json()["tokens"]["access_token"]
            rest: collections.Counter = collections.Counter()
            chat: collections.Counter = collections.Counter()
            offsets = (clog.stat().st_size, rlog.stat().st_size)

            async def load() -> None:
                url = f"ws://127.0.0.1:{rport}/ws/?EIO=4&transport=websocket"
                ws = await open_socket(url, {"x-apikey": key, "x-platform": "qq"})  # connected before the outage
                with database_outage(database):
                    await asyncio.gather(
                        _rest_load(base, token, args.rate, args.seconds, rest),
                        _chat_load(ws, key, args.chat_rate, args.seconds, chat),
                    )

            asyncio.run(load())
            report = {
                "database": args.database,
                "code": str(code_dir),
                "seconds": args.seconds,
                "rest_rate": args.rate,
                "chat_rate": args.chat_rate,
                "configurator_log": _summary(clog, offsets[0]),
                "replier_log": _summary(rlog, offsets[1]),
                "rest_answers": dict(rest),
                "chat_answers": dict(chat),
            }
        finally:
            configurator.stop()
            replier.stop()
    print(json.dumps(report, indent=2))
    print(f"logs kept in {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
