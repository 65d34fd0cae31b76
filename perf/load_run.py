"""Run the load suite end to end: database, both backends, seed data, both locust files, gates.

    python -m perf.load_run                                   # what `nox -s load` runs (SQLite, small)
    python -m perf.load_run --database postgresql
    python -m perf.load_run --users 50 --spawn-rate 10 --run-time 60s --max-p95-ms 500
    python -m perf.load_run --database-url postgresql://... --keep-data    # an existing database

Steps: provision a fresh migrated database (`testsupport.databases.provision_database`, dropped afterwards;
or use `--database-url`, whose `load_` data is deleted afterwards unless `--keep-data`), start both
backends with `invoke start-servers --detach` on free loopback ports, seed with `python -m perf.seed`,
run `perf/locustfile_configurator.py` then `perf/locustfile_replier.py` headless, stop the servers,
and print a summary. Reports go to `reports/load/<UTC timestamp>/`: locust's CSV files
(`<target>_stats.csv`, `_failures.csv`, `_exceptions.csv`, `_stats_history.csv`), HTML reports,
locust's output (`<target>.log`), the server logs (`run/`), `summary.json` and `summary.md`.

Fails (exit 1) when a target's error ratio (failed requests plus user errors over requests) exceeds
`--max-error-ratio` (default 1%) or its aggregated p95 exceeds `--max-p95-ms`.
Only loopback addresses are ever targeted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from testsupport.servers import UNLIMITED_TENANTS, free_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TARGETS = ("configurator", "replier")
DEFAULT_USERS = {"configurator": 20, "replier": 50}
# Logins hash with Argon2id (~0.1-0.2 s of CPU each here): the configurator's users start slower so the
# opening logins do not all queue at once on two cores.
DEFAULT_SPAWN_RATE = {"configurator": 2.0, "replier": 25.0}


@dataclass
class Result:
    target: str
    users: int
    spawn_rate: float
    run_time: str
    requests: int = 0
    failures: int = 0
    user_errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    locust_exit_code: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def error_ratio(self) -> float:
        return (self.failures + self.user_errors) / self.requests if self.requests else 1.0


def _run(args: list[str], log: Path | None = None, timeout: float | None = None, env: dict | None = None) -> int:
    """Run a child process from the project root; output to `log` (or inherited)."""
    env = {**os.environ, **(env or {})}
    if log is None:
        return subprocess.call(args, cwd=ROOT, timeout=timeout, env=env)
    with open(log, "ab") as handle:
        return subprocess.call(args, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, env=env)


@contextlib.contextmanager
def database(kind: str, url: str | None, keep_data: bool, run_id: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(URL, extra environment) for the run: a provisioned database (dropped afterwards) or the given one
    (this run's `load_<run>_` data deleted afterwards).

    On a provisioned PostgreSQL database the servers and the seeder connect with the owner's URL and
    switch to the provisioned non-owner role (`DATABASE_APP_ROLE`), as a deployment does: migrations
    (`invoke start-servers` runs them) need the owner, row-level security needs the non-owner role.
    """
    if url:
        try:
            yield url, {}
        finally:
            if not keep_data:
                prefix = f"load_{run_id}_"
                _run([sys.executable, "-m", "perf.seed", "--cleanup", "--prefix", prefix, "--database-url", url])
        return
    from testsupport.databases import provision_database

    with provision_database(kind) as provisioned:
        if provisioned.app_role:
            yield provisioned.admin_url, {"DATABASE_APP_ROLE": provisioned.app_role}
        else:
            yield provisioned.url, {}


@contextlib.contextmanager
def servers(url: str, run_dir: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    ports = {"configurator": free_port(), "replier": free_port()}
    while ports["replier"] == ports["configurator"]:
        ports["replier"] = free_port()
    args = [
        sys.executable, "-m", "invoke", "start-servers", "--detach",
        "--run-dir", str(run_dir), "--database-url", url, "--host", HOST,
        "--configurator-port", str(ports["configurator"]), "--replier-port", str(ports["replier"]),
    ]  # fmt: skip
    started = time.monotonic()
    code = _run(args, env={**UNLIMITED_TENANTS, **env})
    if code != 0:
        _run([sys.executable, "-m", "invoke", "stop-servers", "--run-dir", str(run_dir)])
        raise SystemExit(f"error: `invoke start-servers` failed (exit {code}); logs in {run_dir}")
    print(f"servers up in {time.monotonic() - started:.1f} s", flush=True)
    urls = {name: f"http://{HOST}:{port}" for name, port in ports.items()}
    try:
        yield urls
    finally:
        _save_metrics(urls["replier"], run_dir / "replier_metrics.txt")
        _run([sys.executable, "-m", "invoke", "stop-servers", "--run-dir", str(run_dir)])


def _metric_totals(path: Path) -> dict[str, float]:
    """Unlabelled `*_total` counters of a saved Prometheus text page."""
    totals: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name.endswith("_total") and "{" not in name:
                totals[name] = _float(value)
    return totals


def _save_metrics(url: str, path: Path) -> None:
    """The replier's own Prometheus counters after the run (to compare with what locust counted)."""
    import httpx

    try:
        path.write_text(httpx.get(f"{url}/metrics", timeout=5).text)
    except httpx.HTTPError as exc:
        path.write_text(f"# could not read {url}/metrics: {exc}\n")


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "", "N/A") else 0.0
    except ValueError:
        return 0.0


def read_stats(prefix: Path, result: Result) -> None:
    """Fill `result` from locust's `<prefix>_[final_]stats.csv` and `_[final_]exceptions.csv`."""
    final = Path(f"{prefix}_final_stats.csv")  # written by perf/load_common.py at quit: complete
    stats = final if final.exists() else Path(f"{prefix}_stats.csv")
    if not stats.exists():
        result.problems.append(f"locust wrote no {stats.name}")
        return
    with open(stats, newline="") as handle:
        for row in csv.DictReader(handle):
            entry = {
                "type": row["Type"],
                "name": row["Name"],
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": _float(row["Requests/s"]),
                "p50_ms": _float(row["50%"]),
                "p95_ms": _float(row["95%"]),
                "p99_ms": _float(row["99%"]),
                "max_ms": _float(row["Max Response Time"]),
            }
            if row["Name"] == "Aggregated":
                result.requests, result.failures, result.rps = entry["requests"], entry["failures"], entry["rps"]
                result.p50_ms, result.p95_ms, result.p99_ms = entry["p50_ms"], entry["p95_ms"], entry["p99_ms"]
                result.max_ms = entry["max_ms"]
            else:
                result.rows.append(entry)
    exceptions = Path(f"{prefix}_final_exceptions.csv" if final.exists() else f"{prefix}_exceptions.csv")
    if exceptions.exists():
        with open(exceptions, newline="") as handle:
            result.user_errors = sum(int(row.get("Count") or 0) for row in csv.DictReader(handle))


def run_locust(target: str, host: str, seed_csv: Path, out: Path, args, users: int, rate: float) -> Result:
    result = Result(target, users, rate, args.run_time)
    prefix = out / target
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "perf" / f"locustfile_{target}.py"),
        "--host", host, "--headless", "-u", str(users), "-r", f"{rate:g}", "-t", args.run_time,
        "--stop-timeout", "15", "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html",
        "--only-summary", "--exit-code-on-error", "0", "--seed-csv", str(seed_csv),
    ]  # fmt: skip
    if target == "replier":
        command += ["--sio-client", args.sio_client]
    if args.wait_min is not None:
        command += ["--wait-min", str(args.wait_min)]
    if args.wait_max is not None:
        command += ["--wait-max", str(args.wait_max)]
    print(f"{target}: {users} users (spawn {rate:g}/s) for {args.run_time} against {host} ...", flush=True)
    started = time.monotonic()
    result.locust_exit_code = _run(command, log=out / f"{target}.log", timeout=_seconds(args.run_time) + 180)
    result.seconds = round(time.monotonic() - started, 1)
    if result.locust_exit_code != 0:
        result.problems.append(f"locust exited with {result.locust_exit_code} (see {target}.log)")
    read_stats(prefix, result)
    log_text = (out / f"{target}.log").read_text(errors="replace")
    if "CPU usage above" in log_text or "CPU usage was too high" in log_text:
        result.notes.append("locust reported high CPU use: the load generator may have limited the rate")
    if result.requests == 0:
        result.problems.append("no requests completed")
    return result


def _seconds(timespan: str) -> float:
    """Seconds of a locust timespan such as 30s, 2m, 1h30m or 90."""
    text, total, number = timespan.strip().lower(), 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
            continue
        unit = {"h": 3600, "m": 60, "s": 1}.get(char)
        if unit is None or not number:
            raise argparse.ArgumentTypeError(f"bad run time {timespan!r} (e.g. 30s, 2m, 1h30m)")
        total, number = total + float(number) * unit, ""
    return total + (float(number) if number else 0.0)


def _run_time(value: str) -> str:
    if _seconds(value) <= 0:
        raise argparse.ArgumentTypeError("run time must be positive")
    return value


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in load],
    }


def gate(results: list[Result], max_error_ratio: float, max_p95_ms: float | None) -> list[str]:
    failed = []
    for r in results:
        failed += [f"{r.target}: {problem}" for problem in r.problems]
        if r.error_ratio > max_error_ratio:
            failed.append(f"{r.target}: error ratio {r.error_ratio:.2%} > {max_error_ratio:.2%}")
        if max_p95_ms is not None and r.p95_ms > max_p95_ms:
            failed.append(f"{r.target}: p95 {r.p95_ms:g} ms > {max_p95_ms:g} ms")
    return failed


def summary_table(results: list[Result]) -> list[str]:
    lines = [
        "| target | users | requests | failures | error % | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        failures = r.failures + r.user_errors
        lines.append(
            f"| {r.target} | {r.users} | {r.requests:,} | {failures:,} | {r.error_ratio:.2%} | {r.rps:,.1f} | "
            f"{r.p50_ms:g} | {r.p95_ms:g} | {r.p99_ms:g} | {r.max_ms:,.0f} |"
        )
        for row in r.rows:
            lines.append(
                f"| &nbsp;&nbsp;{row['type']} {row['name']} | | {row['requests']:,} | {row['failures']:,} | "
                f"{(row['failures'] / row['requests'] if row['requests'] else 0):.2%} | {row['rps']:,.1f} | "
                f"{row['p50_ms']:g} | {row['p95_ms']:g} | {row['p99_ms']:g} | {row['max_ms']:,.0f} |"
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.load_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--database-url", default=None, help="use this database instead of provisioning one")
    parser.add_argument("--keep-data", action="store_true", help="with --database-url: keep the load_ data")
    parser.add_argument(
        "--users", type=int, default=None, help="users per target (default 20 configurator, 50 replier)"
    )
    parser.add_argument("--configurator-users", type=int, default=None)
    parser.add_argument("--replier-users", type=int, default=None)
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second")
    parser.add_argument("--run-time", type=_run_time, default="30s", help="per target (locust timespan, default 30s)")
    parser.add_argument("--tenants", type=int, default=None, help="seeded tenants (default: enough for the users)")
    parser.add_argument("--agents", type=int, default=5, help="agents (API keys, chats) per tenant")
    parser.add_argument("--max-error-ratio", type=float, default=0.01, help="fail above this (default 0.01)")
    parser.add_argument("--max-p95-ms", type=float, default=1000.0, help="fail when a target's p95 is above (ms)")
    parser.add_argument("--only", choices=TARGETS, default=None, help="run one target")
    parser.add_argument("--sio-client", choices=["raw", "socketio"], default="raw", help="replier client")
    parser.add_argument("--wait-min", type=float, default=None, help="think time override (s)")
    parser.add_argument("--wait-max", type=float, default=None, help="think time override (s)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/load/<timestamp>)")
    args = parser.parse_args(argv)
    for name in ("users", "configurator_users", "replier_users", "agents", "tenants"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 5000:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 5000")
    if _seconds(args.run_time) > 3600:
        parser.error("--run-time is capped at 1h")
    if args.spawn_rate is not None and args.spawn_rate <= 0:
        parser.error("--spawn-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or ROOT / "reports" / "load" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets = [args.only] if args.only else list(TARGETS)
    users = {t: getattr(args, f"{t}_users") or args.users or DEFAULT_USERS[t] for t in targets}
    rates = {t: args.spawn_rate or DEFAULT_SPAWN_RATE[t] for t in targets}
    tenants = args.tenants or max(10, math.ceil(max(users.values()) / args.agents))
    kind = "given" if args.database_url else args.database
    print(f"load run -> {out}\ndatabase: {kind}; users: {users}; run time {args.run_time} per target", flush=True)

    results: list[Result] = []
    run_id = secrets.token_hex(3)
    with (
        database(args.database, args.database_url, args.keep_data, run_id) as (url, env),
        servers(url, out / "run", env) as urls,
    ):
        seed_csv = out / "seed.csv"
        seeded = time.monotonic()
        seed_args = ["--tenants", str(tenants), "--agents", str(args.agents), "--database-url", url, "--run-id", run_id]
        code = _run([sys.executable, "-m", "perf.seed", *seed_args, "--out", str(seed_csv)], env=env)
        if code != 0:
            raise SystemExit(f"error: seeding failed (exit {code})")
        seed_seconds = round(time.monotonic() - seeded, 1)
        for target in targets:
            results.append(run_locust(target, urls[target], seed_csv, out, args, users[target], rates[target]))
    if not args.keep_data:
        seed_csv.unlink(missing_ok=True)  # it holds API keys of data that is gone now

    failed = gate(results, args.max_error_ratio, args.max_p95_ms)
    total = round(time.monotonic() - began, 1)
    info = machine()
    table = summary_table(results)
    verdict = "FAILED" if failed else "passed"
    header = (
        f"load run {stamp}: database {kind}, seed {tenants} tenants x {args.agents} agents ({seed_seconds} s), "
        f"{info['cpus']} CPUs, Python {info['python']}, load average {' '.join(map(str, load_before))} before, "
        f"{' '.join(map(str, info['load_average']))} after"
    )
    gates = f"gates: error ratio <= {args.max_error_ratio:.2%}" + (
        f", p95 <= {args.max_p95_ms:g} ms" if args.max_p95_ms is not None else ""
    )
    notes = [f"note: {r.target}: {n}" for r in results for n in r.notes]
    counters = _metric_totals(out / "run" / "replier_metrics.txt")
    replies = sum(row["requests"] - row["failures"] for r in results for row in r.rows if row["name"] == "reply")
    if "replier" in targets and counters:
        notes.append(
            f"cross-check: the replier's /metrics counted {counters.get('replier_messages_in_total', 0):,.0f} "
            f"messages in and {counters.get('replier_messages_out_total', 0):,.0f} replies out; "
            f"locust counted {replies:,} replies"
        )
    lines = [header, "", *table, "", *notes, gates, f"{verdict} in {total} s", *[f"  - {f}" for f in failed]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "stamp": stamp,
                "database": kind,
                "tenants": tenants,
                "agents_per_tenant": args.agents,
                "seed_seconds": seed_seconds,
                "machine": info | {"load_average_before": load_before},
                "gates": {"max_error_ratio": args.max_error_ratio, "max_p95_ms": args.max_p95_ms},
                "results": [asdict(r) | {"error_ratio": r.error_ratio} for r in results],
                "failed": failed,
                "total_seconds": total,
            },
            indent=2,
        )
    )
    print("\n".join(["", *lines, f"reports: {out}"]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
