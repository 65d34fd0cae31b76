"""Connection churn against a real replier: RSS, fds and tracked objects after each round (a script).

Each round opens `--cycles` connections (`--concurrency` at a time) that authenticate with an API key,
send nothing and close. After each round the replier's RSS and open fds are printed (and, with
`--tracemalloc`, a memory report is appended to `--report`, see `perf/traced_replier.py`).

    python -m perf.churn --rounds 4 --cycles 5000
    python -m perf.churn --rounds 4 --cycles 5000 --tracemalloc --report /tmp/churn.txt
    python -m perf.churn --code-dir /tmp/before ...   # the same run against another checkout

`--code-dir` runs the replier from that tree (e.g. `git archive <commit> | tar -x -C DIR`), and the
database is provisioned and the key made with that tree's `testsupport` and `isolation`, so an older
replier gets the schema version it accepts (a replier refuses a schema newer than it knows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from perf.sio_loadgen import open_socket


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def make_key(database) -> str:
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db

    isolation_db.configure(database.url, app_role=database.app_role)
    suffix = os.urandom(4).hex()
    account = system.create_account(f"churn{suffix}", f"churn{suffix}@example.com", "x")
    tenant = system.create_tenant("churn", account["id"])
    ctx = IsolationContext(tenant["id"])
    agent = Scoped(ctx).agents.create(name="churn", persona={}, config={}, llm={})
    _, key = Scoped(ctx).api_keys.create(agent["id"], name="churn")
    isolation_db.close_database()
    return key


async def churn(url: str, key: str, cycles: int, concurrency: int) -> int:
    """`cycles` connect/authenticate/close cycles; returns how many failed."""
    failed = 0
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                ws = await open_socket(url, {"x-apikey": key, "x-platform": "qq"})
                await ws.close()
            except Exception:
                failed += 1

    await asyncio.gather(*(one() for _ in range(cycles)))
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--tracemalloc", action="store_true", help="run under tracemalloc, report per round")
    parser.add_argument("--report", type=Path, default=Path(tempfile.gettempdir()) / "churn_report.txt")
    parser.add_argument("--code-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the replier (repeatable)")
    args = parser.parse_args(argv)
    code_dir = args.code_dir.resolve()
    sys.path.insert(0, str(code_dir))  # testsupport and isolation of the tree under test (its schema)
    from testsupport.databases import provision_database
    from testsupport.servers import ServerProcess, free_port

    with provision_database(args.database) as database:
        key = make_key(database)
        port = free_port()
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database.url,
            PORT=str(port),
            HOST="127.0.0.1",
            LOG_LEVEL="warning",
            PYTHONPATH=str(code_dir),
            MAX_CONNECTIONS_PER_ADDRESS="100000",
            MAX_UNAUTHENTICATED="100000",
            TRACE_REPORT=str(args.report),
        )
        if database.app_role:
            env["DATABASE_APP_ROLE"] = database.app_role
        env.update(dict(item.split("=", 1) for item in args.env))
        if args.tracemalloc:
            args.report.write_text("")
            # Run as a file: its own folder (perf/) comes first on the path, then the code dir's replier.
            cmd = [sys.executable, "-X", "tracemalloc=1", str(Path(__file__).resolve().parent / "traced_replier.py")]
        else:
            cmd = [sys.executable, "-m", "replier"]
        log = Path(tempfile.mkstemp(prefix="churn-replier-", suffix=".log")[1])
        # `python -m` puts its working directory first on the path, before PYTHONPATH: run from the
        # code dir, or the replier would be this checkout's whatever --code-dir says.
        health = f"http://127.0.0.1:{port}/health"
        server = ServerProcess("replier", cmd, env=env, log_path=log, health_url=health, cwd=code_dir)
        server.start()
        try:
            server.wait_healthy(60)
            pid = server.process.pid
            time.sleep(1)
            print(f"{'round':>5} {'RSS MB':>8} {'fds':>5} {'failed':>7} {'seconds':>8}")
            print(f"{0:>5} {rss_mb(pid):>8.1f} {fds(pid):>5} {'-':>7} {'-':>8}")
            url = f"ws://127.0.0.1:{port}/ws/?EIO=4&transport=websocket"
            for number in range(1, args.rounds + 1):
                started = time.monotonic()
                failed = asyncio.run(churn(url, key, args.cycles, args.concurrency))
                took = time.monotonic() - started
                time.sleep(2)  # disconnects processed, freeze loop ticked
                if args.tracemalloc:
                    server.process.send_signal(signal.SIGUSR2)
                    time.sleep(3)
                print(f"{number:>5} {rss_mb(pid):>8.1f} {fds(pid):>5} {failed:>7} {took:>8.1f}", flush=True)
        finally:
            server.stop()
    if args.tracemalloc:
        print(f"memory reports in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
