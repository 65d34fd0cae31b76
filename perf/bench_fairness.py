"""Noisy neighbour benchmark: tenant B's reply latency alone, with tenant A's model hanging, and with
tenant A flooding a slow model, all on ONE shared provider (same base URL and key), in one run.

    python -m perf.bench_fairness                         # SQLite and PostgreSQL
    python -m perf.bench_fairness --database sqlite --b-messages 60

Processes: a fake OpenAI-compatible LLM server (`python -m perf.bench_fairness fake-llm`, a test
double: `bench-fast` answers after --fast seconds, `bench-hang` never answers until the client gives
up, `bench-slow` after --slow seconds; GET /stats counts calls per model), the replier on a fresh
database (testsupport.databases), and load generators (perf/sio_loadgen.py; each client sends its
next message after its reply). B: --b-clients clients on `bench-fast`. A: --a-clients clients on
`bench-hang` (agent timeout --a-timeout), then --flood-clients clients on `bench-slow`; A's load
starts first and runs until B's timed messages are done. Each phase uses a fresh tenant A.
Goal (issue 13): B's p95 with A misbehaving <= 1.5x B's p95 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack

from perf.bench_replier import ROOT, percentile, process
from testsupport.servers import free_port


def serve_fake_llm(port: int, fast: float, slow: float) -> None:
    """TEST DOUBLE: an OpenAI-compatible /v1/chat/completions whose behaviour is the model name."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    calls: Counter[str] = Counter()

    async def completions(request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model", ""))
        calls[model] += 1
        if model == "bench-hang":
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.1)
            return JSONResponse({"error": {"message": "gave up"}}, status_code=504)
        await asyncio.sleep(slow if model == "bench-slow" else fast)
        last = body["messages"][-1]["content"] if body.get("messages") else ""
        return JSONResponse(
            {
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"re: {last[:40]}"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            }
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(calls))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/stats", stats),
            Route("/health", health),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)


def make_agent(url: str, app_role: str | None, name: str, llm: dict, limits: dict | None = None) -> str:
    """A tenant with one agent using `llm` (and the tenant's limit overrides `limits`); its api key."""
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db

    isolation_db.configure(url, app_role=app_role)
    try:
        tag = f"{name}-{os.getpid()}-{time.time_ns()}"
        account = system.create_account(tag, f"{tag}@example.com", "x")
        tenant = system.create_tenant(tag, account["id"])
        ctx = IsolationContext(tenant["id"])
        if limits:
            Scoped(ctx).tenant.set_limits(limits)
        agent = Scoped(ctx).agents.create(name=name, persona={}, config={"memory": {"enabled": False}}, llm=llm)
        _, secret = Scoped(ctx).api_keys.create(agent["id"], name="bench")
        return secret
    finally:
        isolation_db.close_database()


def loadgen(url: str, key: str, clients: int, messages: int, warmup: int, offset: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "perf.sio_loadgen", "--url", url, "--keys", key, "--clients", str(clients),
        "--messages", str(messages), "--warmup", str(warmup), "--offset", str(offset), "--ack",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError(f"load generator failed to start: {line!r}")
    return proc


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("GO\n")
    proc.stdin.flush()


def result(proc: subprocess.Popen) -> dict:
    out = ""
    for line in proc.stdout:
        if line.startswith("RESULT "):
            out = line[7:]
    proc.wait(60)
    return json.loads(out)


def stats(llm_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{llm_port}/stats", timeout=5) as response:
        return json.loads(response.read())


def phase(args, url: str, b_key: str, a_key: str | None, a_clients: int, offset: int) -> dict:
    """B's timed messages, with A's clients sending non-stop meanwhile when `a_key`."""
    a = loadgen(url, a_key, a_clients, 1_000_000, 0, offset + 1000) if a_key else None
    b = loadgen(url, b_key, args.b_clients, args.b_messages, args.warmup, offset)
    try:
        if a is not None:
            go(a)
            time.sleep(args.a_head_start)
        go(b)
        out = result(b)
    finally:
        if a is not None:
            a.terminate()
            a.wait(30)
    lat = out["latencies"]
    return {
        "n": len(lat),
        "p50": percentile(lat, 0.50) * 1000,
        "p95": percentile(lat, 0.95) * 1000,
        "p99": percentile(lat, 0.99) * 1000,
        "errors": out["errors"],
    }


def bench(args, kind: str, llm_port: int) -> list[tuple[str, dict]]:
    from testsupport.databases import provision_database

    base_url = f"http://127.0.0.1:{llm_port}/v1"
    rows: list[tuple[str, dict]] = []
    with ExitStack() as stack:
        prov = stack.enter_context(provision_database(kind))

        def agent(name: str, model: str, timeout: float, limits: dict | None = None) -> str:
            llm = {"provider": "openai", "base_url": base_url, "model": model, "timeout_seconds": timeout}
            return make_agent(prov.url, prov.app_role, name, llm, limits)

        # B sends its three phases within one rate window: its message rates are unlimited, so what is
        # measured is A's effect on it. A keeps the default limits (a flooding A is rate-limited).
        b_key = agent("tenant-b", "bench-fast", 30, {"messages_per_minute": 0, "agent_messages_per_minute": 0})
        hang_key = agent("tenant-a-hang", "bench-hang", args.a_timeout)
        flood_key = agent("tenant-a-flood", "bench-slow", 30)
        port = free_port()
        env = dict(os.environ, DATABASE_URL=prov.url, PORT=str(port), LOG_LEVEL="warning", LLM_PROVIDER="")
        env["LLM_ALLOWED_HOSTS"] = "127.0.0.1"  # the fake LLM listens on loopback
        if prov.app_role:
            env["DATABASE_APP_ROLE"] = prov.app_role
        url = f"http://127.0.0.1:{port}"
        stack.enter_context(process([sys.executable, "-m", "replier"], env=env, log_name=f"fair-{kind}",
                                    ready_url=f"{url}/health"))  # fmt: skip
        rows.append(("B alone", phase(args, url, b_key, None, 0, 0)))
        before = stats(llm_port).get("bench-hang", 0)
        row = phase(args, url, b_key, hang_key, args.a_clients, 100)
        row["a_calls"] = stats(llm_port).get("bench-hang", 0) - before
        rows.append((f"B, A hanging ({args.a_clients} clients, timeout {args.a_timeout:g}s)", row))
        rows.append(
            (
                f"B, A flooding ({args.flood_clients} clients, {args.slow:g}s model)",
                phase(args, url, b_key, flood_key, args.flood_clients, 200),
            )
        )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "fake-llm":
        parser = argparse.ArgumentParser(prog="bench_fairness fake-llm")
        parser.add_argument("command")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--fast", type=float, default=0.05)
        parser.add_argument("--slow", type=float, default=2.0)
        args = parser.parse_args()
        serve_fake_llm(args.port, args.fast, args.slow)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="sqlite,postgresql")
    parser.add_argument("--b-clients", type=int, default=5)
    parser.add_argument("--b-messages", type=int, default=60, help="timed messages per B client and phase")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--a-clients", type=int, default=20)
    parser.add_argument("--a-timeout", type=float, default=5.0, help="A's agent timeout (hanging model)")
    parser.add_argument("--flood-clients", type=int, default=50)
    parser.add_argument("--a-head-start", type=float, default=0.5, help="seconds A sends before B starts")
    parser.add_argument("--fast", type=float, default=0.05, help="B's model latency (s)")
    parser.add_argument("--slow", type=float, default=2.0, help="A's flooding model latency (s)")
    args = parser.parse_args()
    llm_port = free_port()
    llm_cmd = [sys.executable, "-m", "perf.bench_fairness", "fake-llm", "--port", str(llm_port)]
    llm_cmd += ["--fast", str(args.fast), "--slow", str(args.slow)]
    table: list[tuple[str, str, dict]] = []
    with process(llm_cmd, log_name="fake-llm", ready_url=f"http://127.0.0.1:{llm_port}/health"):
        for kind in [d.strip() for d in args.database.split(",") if d.strip()]:
            started = time.time()
            for name, row in bench(args, kind, llm_port):
                table.append((kind, name, row))
                print(f"  {kind}: {name}: p50 {row['p50']:.0f} ms p95 {row['p95']:.0f} ms", flush=True)
            print(f"  {kind}: {time.time() - started:.0f} s", flush=True)
    print()
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"B: {args.b_clients} clients x {args.b_messages} messages, model {args.fast * 1000:.0f} ms")
    print("| database | scenario | p50 ms | p95 ms | p99 ms | p95 / alone | errors | calls to A's hanging model |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    alone = {kind: row["p95"] for kind, name, row in table if name == "B alone"}
    for kind, name, row in table:
        ratio = row["p95"] / alone[kind] if alone.get(kind) else float("nan")
        calls = str(row.get("a_calls", ""))
        print(
            f"| {kind} | {name} | {row['p50']:.0f} | {row['p95']:.0f} | {row['p99']:.0f} | {ratio:.2f}x"
            f" | {row['errors']} | {calls} |"
        )


if __name__ == "__main__":
    main()
