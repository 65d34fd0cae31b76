"""Benchmark: authenticated `GET /api/v1/agents` (a tenant with 20 agents) against a bare FastAPI
endpoint that returns the same JSON, in the same run, under the same uvicorn settings.

    python -m perf.bench_configurator --database sqlite
    python -m perf.bench_configurator --database postgresql --duration 10 --connections 16
    python -m perf.bench_configurator --database postgresql --workers 2   # also: 2 workers vs 1 (issue 15)

Both servers are real `uvicorn` subprocesses (one worker, log level warning). The load comes from a
separate process: a small asyncio HTTP/1.1 keep-alive client (raw sockets, so the client is not the
bottleneck), `--connections` concurrent connections, a warm-up and then `--duration` seconds of
measurement per target. Printed: requests/s, p50/p95/p99 latency, errors, and the ratio
configurator/baseline (goal: >= 0.5, issue 16), and the CPU each request cost in the server process
and in the PostgreSQL backends of the run's database (from /proc, warm-up included). `--json` also
writes the numbers to a file.

Each app keeps its own defaults: the configurator's sync-route pool is `THREADPOOL_SIZE` (8), the bare
app has anyio's 40 (set `THREADPOOL_SIZE=40` to run the configurator with the same pool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PATH = "/api/v1/agents"

# ---------------------------------------------------------------------------------------------
# The baseline: a bare FastAPI app serving the configurator's own response body, loaded from a file.
try:
    from fastapi import FastAPI

    baseline_app = FastAPI()
    _BASELINE_BODY: dict = {}

    @baseline_app.get(PATH)
    def _baseline_agents() -> dict:  # a sync route, like the configurator's
        if not _BASELINE_BODY:
            _BASELINE_BODY.update(json.loads(Path(os.environ["BENCH_BASELINE_JSON"]).read_text()))
        return _BASELINE_BODY
except ImportError:  # pragma: no cover - only when FastAPI is missing
    baseline_app = None


# ---------------------------------------------------------------------------------------------
# The load generator (runs in its own process).
async def _connection(port: int, request: bytes, stop_at: float, record_from: float, out: list, errors: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            end = time.perf_counter()
            if start >= record_from:
                if status == 200:
                    out.append(end - start)
                else:
                    errors.append(status)
    finally:
        writer.close()


async def _load(port: int, token: str, connections: int, warmup: float, duration: float, path: str) -> dict:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/json\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    now = time.perf_counter()
    record_from, stop_at = now + warmup, now + warmup + duration
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(
        *(_connection(port, request, stop_at, record_from, latencies, errors) for _ in range(connections))
    )
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / duration,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
    }


def _load_process(port: int, token: str, connections: int, warmup: float, duration: float, path: str, queue) -> None:
    queue.put(asyncio.run(_load(port, token, connections, warmup, duration, path)))


def measure(port: int, token: str, connections: int, warmup: float, duration: float, path: str = PATH) -> dict:
    """Run the load generator in a separate process against one server; returns its numbers."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, token, connections, warmup, duration, path, queue))
    proc.start()
    deadline = time.monotonic() + warmup + duration + 60
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except Exception:
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"load generator failed (exit code {proc.exitcode})") from None
    proc.join(timeout=10)
    return result


# ---------------------------------------------------------------------------------------------
# CPU accounting: where a request's CPU goes (the server process, PostgreSQL's backends), from /proc.
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone or /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _postgres_cpu_seconds(dbname: str | None) -> float:
    """CPU of the local PostgreSQL backends connected to `dbname` (their title names it: other
    sessions' databases on the same server are left out); 0 without a database name."""
    total = 0.0
    if not dbname:
        return total
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
            except OSError:
                continue
            # "postgres: 15/main: <user> <database> <host>(<port>) <state>"
            if title[:1] == ["postgres:"] and dbname in title[1:5]:
                total += _cpu_seconds(int(entry.name))
    return total


def _seed(base: str, agents: int) -> tuple[str, dict]:
    """A tenant with `agents` agents (made through the API); returns (access token, list response)."""
    with httpx.Client(base_url=base, timeout=30) as http:
        user = f"bench_{os.getpid()}"
        reg = http.post(
            "/api/v1/auth/register",
            json={"username": user, "email": f"{user}@example.com", "password": "bench-password-123"},
        )
        reg.raise_for_status()
        token = reg.json()["tokens"]["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        templates = [t["id"] for t in http.get("/api/v1/agent-templates", headers=headers).json()["items"]]
        for i in range(agents):
            http.post(
                "/api/v1/agents",
                json={"name": f"agent {i:02d}", "template_id": templates[i % len(templates)]},
                headers=headers,
            ).raise_for_status()
        listed = http.get(PATH, headers=headers, params={"limit": agents})
        listed.raise_for_status()
        assert len(listed.json()["items"]) == agents
        return token, listed.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--workers", type=int, default=1, help="also measure the configurator with this many uvicorn workers"
    )
    args = parser.parse_args(argv)

    # Imported here, not at the top: the baseline server imports this module and must stay bare.
    from isolation.db import parse_database_url
    from testsupport.databases import provision_database
    from testsupport.servers import UNLIMITED_TENANTS, free_port, running_server

    def uvicorn(port: int, *app: str, workers: int = 1) -> list[str]:
        """Both servers get the same uvicorn flags (one worker, log level warning, no access log)."""
        flags = ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]
        if workers > 1:
            flags += ["--workers", str(workers)]
        return [sys.executable, "-m", "uvicorn", *app, "--port", str(port), *flags]

    with provision_database(args.database) as db, tempfile.TemporaryDirectory() as tmp:
        cfg_port, base_port = free_port(), free_port()
        env = {
            **os.environ,
            "DATABASE_URL": db.url,
            "SECRET_KEY": "bench-secret-key-0123456789abcdef0123456789",
            "LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("ENVIRONMENT", None)
        env.update(UNLIMITED_TENANTS)
        if db.app_role:
            env["DATABASE_APP_ROLE"] = db.app_role
        # The configurator as `python -m configurator` would serve it, with the baseline's uvicorn flags.
        cfg_cmd = uvicorn(cfg_port, "--factory", "configurator.main:create_app")
        cfg_ready = f"http://127.0.0.1:{cfg_port}/health"
        with running_server(cfg_cmd, env=env, cwd=ROOT, ready_url=cfg_ready, name="configurator") as cfg:
            token, body = _seed(f"http://127.0.0.1:{cfg_port}", args.agents)
            body_path = Path(tmp) / "agents.json"
            body_path.write_text(json.dumps(body))
            base_env = {**env, "BENCH_BASELINE_JSON": str(body_path)}
            base_cmd = uvicorn(base_port, "perf.bench_configurator:baseline_app")
            base_ready = f"http://127.0.0.1:{base_port}{PATH}"
            with running_server(base_cmd, env=base_env, cwd=ROOT, ready_url=base_ready, name="baseline") as base:
                print(
                    f"database={args.database} agents={args.agents} connections={args.connections} "
                    f"warmup={args.warmup}s duration={args.duration}s cpus={os.cpu_count()} "
                    f"response={len(json.dumps(body))} bytes"
                )
                results = {}
                dbname = (parse_database_url(db.url).params or {}).get("dbname") if db.app_role else None
                pids = {"baseline (bare FastAPI)": base.process.pid, "configurator": cfg.process.pid}
                for name, port in (("baseline (bare FastAPI)", base_port), ("configurator", cfg_port)):
                    server_cpu, pg_cpu = _cpu_seconds(pids[name]), _postgres_cpu_seconds(dbname)
                    results[name] = r = measure(port, token, args.connections, args.warmup, args.duration)
                    # CPU per request over warm-up + measurement (both served the same kind of request).
                    served = max(1.0, r["rps"] * (args.warmup + args.duration))
                    r["server_cpu_us"] = (_cpu_seconds(pids[name]) - server_cpu) / served * 1e6
                    r["postgres_cpu_us"] = (_postgres_cpu_seconds(dbname) - pg_cpu) / served * 1e6
                    print(
                        f"{name:<24} {r['rps']:>8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p95 {r['p95_ms']:6.2f} ms  "
                        f"p99 {r['p99_ms']:6.2f} ms  requests {r['requests']}  errors {r['errors']}  "
                        f"CPU/request: server {r['server_cpu_us']:.0f} us, postgres {r['postgres_cpu_us']:.0f} us"
                    )
                if args.workers > 1:
                    # The same database and token: the N-worker configurator (its own process tree;
                    # CPU per request is not split by process here).
                    multi_port = free_port()
                    multi_cmd = uvicorn(multi_port, "--factory", "configurator.main:create_app", workers=args.workers)
                    multi_ready = f"http://127.0.0.1:{multi_port}/health"
                    name = f"configurator x{args.workers} workers"
                    with running_server(multi_cmd, env=env, cwd=ROOT, ready_url=multi_ready, name="configurator-n"):
                        results[name] = r = measure(multi_port, token, args.connections, args.warmup, args.duration)
                    print(
                        f"{name:<24} {r['rps']:>8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p95 {r['p95_ms']:6.2f} ms  "
                        f"p99 {r['p99_ms']:6.2f} ms  requests {r['requests']}  errors {r['errors']}"
                    )
    ratio = results["configurator"]["rps"] / results["baseline (bare FastAPI)"]["rps"]
    verdict = "meets" if ratio >= 0.5 else "BELOW"
    print(f"ratio configurator/baseline = {ratio:.2f} ({verdict} the 0.5 goal)")
    if args.workers > 1:
        scaling = results[f"configurator x{args.workers} workers"]["rps"] / results["configurator"]["rps"]
        print(f"ratio configurator {args.workers} workers / 1 worker = {scaling:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"database": args.database, "ratio": ratio, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
