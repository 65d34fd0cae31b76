"""Soak: chat and REST traffic plus connection churn against both backends for a while (not in CI).

Starts the configurator and the replier on a throw-away database (loopback only) and runs, for
`--minutes`, at the same time:

* chat: `--chat-clients` API-Server clients sending `--chat-rate` messages a second in total, each
  waiting for its reply (offline agents: the replier's own pipeline, no model);
* REST: `--rest-rate` requests a second (agent list, tenant stats, one agent create + delete in ten);
* churn: `--churn-rate` connect/authenticate/close cycles a second.

Every minute it prints each backend's RSS and open fds, the chat and REST p99 of that minute and
the errors. It exits 1 on **unbounded growth**, defined as any of:

* RSS: the largest RSS of the second half of the run exceeds the largest of the first half (after
  the first minute, the warm-up) by more than 10% and 16 MB, for either backend;
* fds: the last sample exceeds the first one after the warm-up by more than 20, for either backend;
* latency: a p99 of the last minute more than 3x the p99 of the second minute and above 100 ms;
* errors: more than 0.1% of the chat messages or REST requests failed.

    python -m perf.soak --minutes 10 --database sqlite

On a PostgreSQL server that runs with autovacuum off (a CI machine's setting), the run's database is
ANALYZEd every `--analyze-every` seconds, as autovacuum would: without statistics the planner reads a
whole chat stream for each lookup by message id, and the soak would measure that configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from perf.backends import register, server_env
from perf.sio_loadgen import envelope, open_socket
from testsupport.databases import provision_database
from testsupport.servers import UNLIMITED_TENANTS, ServerProcess, free_port

SECRET_KEY = "soak-secret-key-0123456789abcdef-0123"  # noqa: S105 - a throw-away database's


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


@dataclass
class Minute:
    """What one minute of load measured."""

    chat: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)
    chat_errors: int = 0
    rest_errors: int = 0
    churn: int = 0
    churn_errors: int = 0
    health: list[float] = field(default_factory=list)
    health_failures: int = 0


class Soak:
    def __init__(self, args, base: str, ws_url: str, token: str, keys: list[str]) -> None:
        self.args = args
        self.base = base
        self.ws_url = ws_url
        self.token = token
        self.keys = keys
        self.minute = Minute()
        self.stop_at = 0.0

    async def chat_client(self, index: int, key: str) -> None:
        ws = await open_socket(self.ws_url, {"x-apikey": key, "x-platform": "qq"})
        interval = self.args.chat_clients / self.args.chat_rate
        n = 0
        try:
            while time.monotonic() < self.stop_at:
                started = time.monotonic()
                await ws.send(envelope(key, "qq", f"soak-user-{index}", n, f"soak message {n}"))
                n += 1
                try:
                    await asyncio.wait_for(self._reply(ws), 30)
                    self.minute.chat.append(time.monotonic() - started)
                except (TimeoutError, RuntimeError):
                    self.minute.chat_errors += 1
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            await ws.close()

    @staticmethod
    async def _reply(ws) -> None:
        while True:
            packet = await ws.recv()
            if packet == "2":
                await ws.send("3")
            elif packet.startswith("42"):
                kind = json.loads(packet[2:])[1].get("type")
                if kind == "sys_std":
                    return
                if kind == "custom_error":
                    raise RuntimeError(packet[:200])

    async def rest(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=self.base, timeout=30, headers=headers, limits=limits) as http:

            async def one(n: int) -> None:
                started = time.monotonic()
                try:
                    if n % 10 == 0:
                        created = await http.post("/api/v1/agents", json={"name": f"soak-{uuid.uuid4().hex[:8]}"})
                        created.raise_for_status()
                        (await http.delete(f"/api/v1/agents/{created.json()['id']}")).raise_for_status()
                    elif n % 2:
                        (await http.get("/api/v1/agents")).raise_for_status()
                    else:
                        (await http.get("/api/v1/tenant/stats")).raise_for_status()
                    self.minute.rest.append(time.monotonic() - started)
                except httpx.HTTPError:
                    self.minute.rest_errors += 1

            await self._paced(one, self.args.rest_rate)

    async def churn(self) -> None:
        async def one(n: int) -> None:
            try:
                ws = await open_socket(self.ws_url, {"x-apikey": self.keys[n % len(self.keys)], "x-platform": "qq"})
                await ws.close()
                self.minute.churn += 1
            except Exception:  # a refused or reset connection is what is counted here
                self.minute.churn_errors += 1

        await self._paced(one, self.args.churn_rate)

    async def health(self, urls: list[str]) -> None:
        """Both backends' /health once a second: its latency under this load, and any non-200."""
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < self.stop_at:
                for url in urls:
                    started = time.monotonic()
                    try:
                        response = await http.get(url)
                        self.minute.health.append(time.monotonic() - started)
                        if response.status_code != 200:
                            self.minute.health_failures += 1
                    except httpx.HTTPError:
                        self.minute.health_failures += 1
                await asyncio.sleep(1)

    async def _paced(self, job, rate: float) -> None:
        tasks: set[asyncio.Task] = set()
        started = time.monotonic()
        n = 0
        while time.monotonic() < self.stop_at:
            task = asyncio.create_task(job(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)

    async def analyze(self, statement: Callable[[], None], every: float) -> None:
        """Run `statement` (ANALYZE as the owner) every `every` seconds: autovacuum's part, for a
        PostgreSQL server that runs without it (see `main`)."""
        while time.monotonic() + every < self.stop_at:
            await asyncio.sleep(every)
            await asyncio.to_thread(statement)

    async def run(
        self, servers: dict[str, int], health_urls: list[str], analyze: Callable[[], None] | None = None
    ) -> list[dict]:
        self.stop_at = time.monotonic() + self.args.minutes * 60
        load = [asyncio.create_task(self.rest()), asyncio.create_task(self.churn())]
        if analyze is not None:
            load.append(asyncio.create_task(self.analyze(analyze, self.args.analyze_every)))
        load.append(asyncio.create_task(self.health(health_urls)))
        load += [
            asyncio.create_task(self.chat_client(i, self.keys[i % len(self.keys)]))
            for i in range(self.args.chat_clients)
        ]
        rows = []
        header = f"{'min':>3} " + " ".join(f"{name[:4] + ' RSS':>9} {name[:4] + ' fds':>8}" for name in servers)
        header += (
            f" {'chat p99':>9} {'REST p99':>9} {'health max':>10} {'chats':>6} {'REST':>6} {'churn':>6} {'errors':>6}"
        )
        print(header, flush=True)
        for number in range(1, int(self.args.minutes) + 1):
            await asyncio.sleep(max(0.0, self.stop_at - (self.args.minutes - number) * 60 - time.monotonic()))
            minute, self.minute = self.minute, Minute()
            row = {"minute": number}
            for name, pid in servers.items():
                row[f"{name}_rss_mb"] = round(rss_mb(pid), 1)
                row[f"{name}_fds"] = fd_count(pid)
            row.update(
                chat_p99_ms=round(p99(minute.chat), 1),
                rest_p99_ms=round(p99(minute.rest), 1),
                health_max_ms=round(max(minute.health, default=0.0) * 1000, 1),
                health_failures=minute.health_failures,
                chats=len(minute.chat),
                rest=len(minute.rest),
                churn=minute.churn,
                errors=minute.chat_errors + minute.rest_errors + minute.churn_errors,
            )
            rows.append(row)
            cells = " ".join(f"{row[f'{n}_rss_mb']:>9.1f} {row[f'{n}_fds']:>8}" for n in servers)
            print(
                f"{number:>3} {cells} {row['chat_p99_ms']:>9.1f} {row['rest_p99_ms']:>9.1f}"
                f" {row['health_max_ms']:>10.1f} {row['chats']:>6}"
                f" {row['rest']:>6} {row['churn']:>6} {row['errors']:>6}",
                flush=True,
            )
        await asyncio.gather(*load, return_exceptions=True)
        return rows


def verdict(rows: list[dict], names: list[str]) -> list[str]:
    """The growth rule of the module docstring; the reasons it fails (empty: bounded)."""
    problems = []
    steady = rows[1:] if len(rows) > 2 else rows
    half = len(steady) // 2
    first, second = steady[:half] or steady, steady[half:]
    for name in names:
        before = max(r[f"{name}_rss_mb"] for r in first)
        after = max(r[f"{name}_rss_mb"] for r in second)
        if after > before * 1.10 and after - before > 16:
            problems.append(f"{name} RSS grew from {before:.1f} MB to {after:.1f} MB in the second half")
        fds_start, fds_end = steady[0][f"{name}_fds"], rows[-1][f"{name}_fds"]
        if fds_end - fds_start > 20:
            problems.append(f"{name} fds grew from {fds_start} to {fds_end}")
    if len(rows) >= 3:
        for kind in ("chat_p99_ms", "rest_p99_ms"):
            early, late = rows[1][kind], rows[-1][kind]
            if late > 3 * early and late > 100:
                problems.append(f"{kind} rose from {early} to {late}")
    failures = sum(r["health_failures"] for r in rows)
    if failures:
        problems.append(f"/health failed {failures} times")
    total = sum(r["chats"] + r["rest"] + r["churn"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    if total and errors / total > 0.001:
        problems.append(f"{errors} errors in {total} operations")
    return problems


def _env(database, port: int, code_dir: Path) -> dict[str, str]:
    # The per-tenant limits are off (as in the benchmarks): one tenant's 20 REST requests a second and
    # 20 messages a second are over the defaults, and a soak measures growth, not the limits' answers.
    return server_env(
        database, port, code_dir, secret_key=SECRET_KEY, log_level="warning", LLM_PROVIDER="", **UNLIMITED_TENANTS
    )


def _analyzer(database, args) -> Callable[[], None] | None:
    """ANALYZE of the run's database as its owner, when the server runs without autovacuum (and
    `--analyze-every` is not 0). Without statistics PostgreSQL's planner reads a whole chat stream
    for every lookup by message id, which is the server's configuration, not the replier, growing
    (docs/RELIABILITY.md): autovacuum (the default) analyzes a table this busy about once a minute."""
    if database.kind != "postgresql" or args.analyze_every <= 0:
        return None
    import psycopg

    from testsupport.databases import _conninfo

    conninfo = _conninfo(database.admin_url)
    with psycopg.connect(conninfo) as conn:
        if conn.execute("SHOW autovacuum").fetchone()[0] != "off":
            return None
    print(f"the server runs with autovacuum off: ANALYZE every {args.analyze_every:g} s, as autovacuum would")

    def analyze() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("ANALYZE")

    return analyze


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chat-clients", type=int, default=10)
    parser.add_argument("--chat-rate", type=float, default=50.0, help="chat messages a second, all clients")
    parser.add_argument("--rest-rate", type=float, default=20.0, help="REST requests a second")
    parser.add_argument("--churn-rate", type=float, default=20.0, help="connect/close cycles a second")
    parser.add_argument("--code-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path, help="also write the rows and the verdict here")
    parser.add_argument(
        "--analyze-every",
        type=float,
        default=60.0,
        help="PostgreSQL with autovacuum off: ANALYZE the run's database this often (0: never)",
    )
    args = parser.parse_args(argv)
    code_dir = args.code_dir.resolve()
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    with provision_database(args.database) as database:
        from isolation import IsolationContext, Scoped, system
        from isolation import db as isolation_db

        isolation_db.configure(database.url, app_role=database.app_role)
        keys = []
        for i in range(3):
            suffix = secrets.token_hex(4)
            account = system.create_account(f"soak{suffix}", f"soak{suffix}@example.com", "x")
            tenant = system.create_tenant(f"soak {i}", account["id"])
            ctx = IsolationContext(tenant["id"])
            agent = Scoped(ctx).agents.create(name=f"soak-{i}", persona={}, config={}, llm={})
            keys.append(Scoped(ctx).api_keys.create(agent["id"], name="soak")[1])
        isolation_db.close_database()
        ports = {"configurator": free_port(), "replier": free_port()}
        servers = {}
        for name, port in ports.items():
            server = ServerProcess(
                name,
                [sys.executable, "-m", name],
                env=_env(database, port, code_dir),
                log_path=folder / f"{name}.log",
                health_url=f"http://127.0.0.1:{port}/health",
                cwd=code_dir,
            )
            server.start()
            servers[name] = server
        try:
            for server in servers.values():
                server.wait_healthy(60)
            base = f"http://127.0.0.1:{ports['configurator']}"
            soak = Soak(
                args,
                base,
                f"ws://127.0.0.1:{ports['replier']}/ws/?EIO=4&transport=websocket",
                register(base, "soak"),
                keys,
            )
            pids = {name: server.process.pid for name, server in servers.items()}
            health_urls = [f"http://127.0.0.1:{port}/health" for port in ports.values()]
            rows = asyncio.run(soak.run(pids, health_urls, _analyzer(database, args)))
        finally:
            for server in servers.values():
                server.stop()
    problems = verdict(rows, list(ports))
    print("bounded: no growth beyond the rule" if not problems else "UNBOUNDED: " + "; ".join(problems))
    print(f"server logs in {folder}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "problems": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
