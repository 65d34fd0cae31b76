"""Replier throughput and latency next to its baselines, measured in one run.

    python -m perf.bench_replier                 # default: a few minutes
    python -m perf.bench_replier --hold 3000     # also: 3,000 open connections, 50 of them chatting
    python -m perf.bench_replier --db sqlite --messages 200
    python -m perf.bench_replier --db postgresql --replicas 2   # also 1 and 2 repliers behind HAProxy
    python -m perf.bench_replier --db postgresql --code-dir /tmp/before   # + the replier of another tree

With PostgreSQL the note column gives the CPU each message cost in the replier process and in the
PostgreSQL backends of the run's database (from /proc, over the timed run and its warm-up), and the
store's jobs per batch (its /health counters): figures that hold better than rates on a busy machine.

Servers (each its own process): maim_message's reference `WebSocketServer` echo (logs at WARNING),
a bare python-socketio echo, and the replier's full pipeline (auth, validation, isolation context,
inbound + reply + usage rows, history and memories, offline provider) on SQLite and PostgreSQL
(fresh databases from `testsupport.databases.provision_database`). The load comes from separate
processes (perf/sio_loadgen.py): each client sends its next message after its reply.
Server logs go to $TMPDIR/maitenant-bench-<server>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from testsupport.servers import UNLIMITED_TENANTS, free_port, healthy, running_server, wait_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until `port` accepts a connection (maim's reference server has no HTTP route to poll)."""

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_ready(accepts, proc, timeout, what=f"port {port}")


@contextmanager
def process(
    cmd: list[str], env: dict | None = None, log_name: str = "server", ready_url: str | None = None, cwd: str = ROOT
):
    """A server for the block (ready when `ready_url`, a /health URL, says 200), its log in
    $TMPDIR/maitenant-bench-<log_name>.log; stopped with SIGINT (SIGKILL after 20 s) on the way out."""
    log_path = os.path.join(tempfile.gettempdir(), f"maitenant-bench-{log_name}.log")
    with running_server(  # env None: this process's environment
        cmd, env=env, ready_url=ready_url, cwd=cwd, log_path=log_path, ok=healthy, name=log_name, stop_timeout=20
    ) as server:
        yield server.process


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_cpu_seconds(dbname: str) -> float:
    """CPU of the local PostgreSQL backends connected to `dbname` (their process title names it)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    title = fh.read().replace(b"\0", b" ").decode(errors="replace").split()
            except OSError:
                continue
            if title[:1] == ["postgres:"] and dbname in title[1:5]:
                total += cpu_seconds(int(entry))
    return total


def store_counters(url: str) -> tuple[int, int, float]:
    """(batches, jobs, CPU seconds of its worker threads) of the replier's database store, from /health."""
    import httpx

    body = httpx.get(f"{url}/health", timeout=10).json()
    return int(body.get("db_batches", 0)), int(body.get("db_jobs", 0)), float(body.get("db_cpu_seconds", 0.0))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Result:
    name: str
    clients: int
    messages: int
    rate: float
    p50: float
    p95: float
    p99: float
    errors: int
    extra: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_load(
    name: str,
    url: str,
    keys: list[str],
    *,
    clients: int,
    messages: int,
    mode: str,
    ack: bool,
    procs: int,
    warmup: int,
    idle: int = 0,
    idle_procs: int = 0,
) -> Result:
    procs = max(1, min(procs, clients))
    loaders = []
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    idle_per = [idle // idle_procs + (1 if i < idle % idle_procs else 0) for i in range(idle_procs)] if idle else []
    offset = 0
    specs = [(n, 0) for n in per] + [(0, n) for n in idle_per]
    for chatting, idlers in specs:
        cmd = [
            sys.executable, "-m", "perf.sio_loadgen", "--url", url, "--keys", ",".join(keys),
            "--clients", str(chatting), "--idle", str(idlers), "--messages", str(messages),
            "--warmup", str(warmup), "--offset", str(offset), "--mode", mode,
        ]  # fmt: skip
        if ack:
            cmd.append("--ack")
        offset += chatting
        loaders.append(
            subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        )
    connected = refused = 0
    for loader in loaders:
        line = loader.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"load generator failed to start: {line!r}")
        parts = line.split()
        connected += int(parts[1])
        refused += int(parts[2].split("=")[1])
    if idle:
        time.sleep(3.0)  # let the server settle after the connect burst (it gc.freeze()s after bursts)
    for loader in loaders:
        loader.stdin.write("GO\n")
        loader.stdin.flush()
    results = []
    for loader in loaders:
        out = ""
        for line in loader.stdout:
            if line.startswith("RESULT "):
                out = line[7:]
        loader.wait(60)
        results.append(json.loads(out))
    chatting_results = [r for r, (c, _) in zip(results, specs, strict=True) if c]
    latencies = [x for r in chatting_results for x in r["latencies"]]
    start = min(r["start"] for r in chatting_results)
    end = max(r["start"] + r["elapsed"] for r in chatting_results)
    errors = sum(r["errors"] for r in results) + refused
    extra = f"connected={connected}" if idle else ""
    return Result(
        name,
        clients,
        len(latencies),
        len(latencies) / (end - start),
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.95) * 1000,
        percentile(latencies, 0.99) * 1000,
        errors,
        extra,
    )


def make_keys(url: str, app_role: str | None, count: int) -> list[str]:
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db

    isolation_db.configure(url, app_role=app_role)
    keys = []
    for i in range(count):
        account = system.create_account(f"bench{i}-{os.getpid()}", f"bench{i}-{os.getpid()}@example.com", "x")
        tenant = system.create_tenant(f"bench-{i}", account["id"])
        ctx = IsolationContext(tenant["id"])
        agent = Scoped(ctx).agents.create(name=f"bench-agent-{i}", persona={"interests": ["speed"]}, config={}, llm={})
        _, secret = Scoped(ctx).api_keys.create(agent["id"], name="bench")
        keys.append(secret)
    isolation_db.close_database()
    return keys


def print_table(results: list[Result], reference: dict[int, float]) -> None:
    header = (
        f"{'server':<36} {'clients':>7} {'msgs':>6} {'rt/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'vs maim':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ref = reference.get(r.clients)
        ratio = f"{r.rate / ref:.2f}x" if ref else "-"
        print(
            f"{r.name:<36} {r.clients:>7} {r.messages:>6} {r.rate:>8.0f} {r.p50:>7.1f} {r.p95:>7.1f} {r.p99:>7.1f} "
            f"{r.errors:>6} {ratio:>7}  {r.extra}"
        )


def cluster_scenario(scenario, prov, keys: list[str], replicas: int, env: dict) -> list[Result]:
    """The same load through HAProxy to `replicas` repliers (testsupport.cluster, as `invoke start-cluster`)."""
    from testsupport.cluster import Cluster
    from testsupport.redis_server import TEST_REDIS_URL

    backend_env = {k: env[k] for k in ("LOG_LEVEL", "LLM_PROVIDER", "MAX_CONNECTIONS", "MAX_UNAUTHENTICATED")}
    backend_env["MAX_CONNECTIONS_PER_ADDRESS"] = env["MAX_CONNECTIONS_PER_ADDRESS"]
    # No tenant limits, as for the single replier: with Redis they are one count for the whole cluster.
    backend_env.update(UNLIMITED_TENANTS)
    if prov.app_role:
        backend_env["DATABASE_APP_ROLE"] = prov.app_role
    run_dir = tempfile.mkdtemp(prefix="maitenant-bench-cluster-")
    cluster = Cluster(
        database_url=prov.url,
        redis_url=os.environ.get("REDIS_URL", TEST_REDIS_URL),
        run_dir=run_dir,
        replicas=replicas,
        configurator_workers=1,
        redis_prefix=f"bench-{os.getpid()}-{replicas}",
        env=backend_env,
    ).start()
    try:
        return scenario(f"replier x{replicas} behind HAProxy (postgresql)", cluster.replier_http, keys, "maim", True)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite,postgresql", help="replier databases to measure")
    parser.add_argument("--messages", type=int, default=100, help="timed messages per client at 50 clients")
    parser.add_argument("--single-messages", type=int, default=1000, help="timed messages with 1 client")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes for the concurrent run")
    parser.add_argument("--hold", type=int, default=0, help="also hold this many connections (e.g. 3000)")
    parser.add_argument("--hold-chatting", type=int, default=50)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--code-dir", action="append", default=[], help="also run the replier of this tree (e.g. a before checkout)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="also on PostgreSQL: 1 and N repliers behind HAProxy (invoke start-cluster's setup; needs haproxy, Redis)",
    )
    args = parser.parse_args()

    from testsupport.databases import provision_database

    results: list[Result] = []
    reference: dict[int, float] = {}
    pyexe = sys.executable

    def scenario(name, url, keys, mode, ack, pid=None, dbname=None):
        def measured(clients, messages, procs):
            before = (cpu_seconds(pid), postgres_cpu_seconds(dbname) if dbname else 0.0) if pid else None
            counters = store_counters(url) if pid else None
            r = run_load(
                name, url, keys, clients=clients, messages=messages, mode=mode, ack=ack, procs=procs,
                warmup=args.warmup,
            )  # fmt: skip
            if before is not None:
                sent = clients * (messages + args.warmup)
                replier_us = (cpu_seconds(pid) - before[0]) / sent * 1e6
                r.extra += f"cpu/msg replier {replier_us:.0f} us"
                if dbname:
                    r.extra += f", postgres {(postgres_cpu_seconds(dbname) - before[1]) / sent * 1e6:.0f} us"
                batches, jobs, store_cpu = store_counters(url)
                r.extra += f" (store threads {(store_cpu - counters[2]) / sent * 1e6:.0f} us)"
                if batches > counters[0]:
                    r.extra += f"; {(jobs - counters[1]) / (batches - counters[0]):.1f} jobs/batch"
            return r

        out = [measured(1, args.single_messages, 1), measured(args.clients, args.messages, args.procs)]
        for r in out:
            print(
                f"  {name}: {r.clients} client(s) {r.rate:.0f} rt/s p50 {r.p50:.1f} ms p99 {r.p99:.1f} ms", flush=True
            )
        return out

    if not args.skip_baselines:
        port = free_port()
        with process([pyexe, "-m", "perf.echo_servers", "maim", "--port", str(port)], log_name="maim") as proc:
            wait_port(port, proc)
            time.sleep(0.5)
            keys = [f"key-{i}" for i in range(args.clients)]
            out = scenario("maim reference WebSocketServer echo", f"http://127.0.0.1:{port}", keys, "maim", True)
            for r in out:
                reference[r.clients] = r.rate
            results += out
        port = free_port()
        sio_cmd = [pyexe, "-m", "perf.echo_servers", "sio", "--port", str(port)]
        with process(sio_cmd, log_name="sio", ready_url=f"http://127.0.0.1:{port}/health"):
            results += scenario("bare python-socketio echo", f"http://127.0.0.1:{port}", ["k"], "echo", False)

    runs = [(kind, ROOT) for kind in [d.strip() for d in args.db.split(",") if d.strip()]]
    runs += [(kind, os.path.abspath(code)) for code in args.code_dir for kind, _ in list(runs)]
    for kind, code_dir in runs:
        label = kind if code_dir == ROOT else f"{kind}, {os.path.basename(code_dir.rstrip('/'))}"
        with ExitStack() as stack:
            try:
                prov = stack.enter_context(provision_database(kind))
            except Exception as exc:
                print(f"  replier on {kind}: skipped ({exc})", flush=True)
                continue
            keys = make_keys(prov.url, prov.app_role, args.clients)
            port = free_port()
            env = dict(os.environ, DATABASE_URL=prov.url, PORT=str(port), LOG_LEVEL="warning", LLM_PROVIDER="")
            env.update(UNLIMITED_TENANTS)
            env["MAX_CONNECTIONS"] = str(max(10_000, args.hold + 100))
            # Every benchmark client comes from 127.0.0.1 and many connect at once.
            env["MAX_CONNECTIONS_PER_ADDRESS"] = env["MAX_UNAUTHENTICATED"] = env["MAX_CONNECTIONS"]
            if prov.app_role:
                env["DATABASE_APP_ROLE"] = prov.app_role
            url = f"http://127.0.0.1:{port}"
            replier_cmd = [pyexe, "-m", "replier"]
            if code_dir != ROOT:
                env["PYTHONPATH"] = code_dir
            proc = stack.enter_context(
                process(replier_cmd, env=env, log_name=f"replier-{kind}", ready_url=f"{url}/health", cwd=code_dir)
            )
            dbname = prov.url.rsplit("/", 1)[1].split("?")[0] if kind == "postgresql" else None
            results += scenario(f"replier full pipeline ({label})", url, keys, "maim", True, proc.pid, dbname)
            if args.replicas and kind == "postgresql" and code_dir == ROOT:
                stack.close()  # the lone replier is done: its cores go to the clusters
                prov = stack.enter_context(provision_database(kind))
                keys = make_keys(prov.url, prov.app_role, args.clients)
                for replicas in sorted({1, args.replicas}):
                    results += cluster_scenario(scenario, prov, keys, replicas, env)
            if args.hold and code_dir == ROOT:
                r = run_load(
                    f"replier {args.hold} conns ({kind})", url, keys, clients=args.hold_chatting,
                    messages=args.messages, mode="maim", ack=True, procs=args.procs, warmup=args.warmup,
                    idle=args.hold - args.hold_chatting, idle_procs=3,
                )  # fmt: skip
                r.extra += f" replier RSS {rss_mb(proc.pid):.0f} MB"
                print(f"  hold {args.hold}: {r.rate:.0f} rt/s p95 {r.p95:.1f} p99 {r.p99:.1f} {r.extra}", flush=True)
                results.append(r)
    print()
    print(f"machine: {os.cpu_count()} cores; round trips = send, wait for the reply, send the next")
    print_table(results, reference)


if __name__ == "__main__":
    main()
