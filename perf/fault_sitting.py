"""Issue 12's six fault points for two trees in one sitting, and the before/after tables (a script).

Runs, one at a time and alternating the trees for each case, every fault script of perf/:

* `perf/crash_run.py --fault kill9|sigterm|sigterm-sigint` on SQLite and PostgreSQL (points 1, 2);
* `perf.fault_logs --fault outage` on both databases and `--fault disk-full` on SQLite (points 3-5);
* `perf.churn --rounds 4 --cycles 5000` on SQLite (point 6);

writes each run's output to `--out/<case>-<tree>.json` (`.err` beside it, `sitting.log` with the time
and load average of every start and end), then prints the tables that docs/PERFORMANCE.md quotes.
About 13 minutes on a quiet 2-core machine. The trees are source directories, e.g.

    git archive 667f891 | tar -x -C /tmp/before-667 && git archive HEAD | tar -x -C /tmp/after-head
    python -m perf.fault_sitting --before /tmp/before-667 --after /tmp/after-head --out /tmp/sitting
    python -m perf.fault_sitting --out /tmp/sitting --summary-only      # the tables again
    python -m perf.fault_sitting ... --only sigterm-sigint-sqlite        # some cases (a name prefix)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TREES = ("after", "before")


def cases(dirs: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(name, command) of every run, in sitting order, both trees per case."""
    py = sys.executable
    runs: list[tuple[str, list[str]]] = []
    for fault in ("kill9", "sigterm", "sigterm-sigint"):
        for db in ("sqlite", "postgresql"):
            wait = ["--wait", "60"] if fault == "kill9" else []
            for tree in TREES:
                command = [py, "perf/crash_run.py", "--fault", fault, "--database", db, *wait]
                runs.append((f"{fault}-{db}-{tree}", [*command, "--code-dir", str(dirs[tree])]))
    load = ["--seconds", "30", "--rate", "100", "--chat-rate", "100"]
    for fault, db in (("outage", "postgresql"), ("outage", "sqlite"), ("disk-full", "sqlite")):
        for tree in TREES:
            command = [py, "-m", "perf.fault_logs", "--fault", fault, "--database", db, *load]
            runs.append((f"{fault}-{db}-{tree}", [*command, "--code-dir", str(dirs[tree])]))
    for tree in TREES:
        command = [py, "-m", "perf.churn", "--rounds", "4", "--cycles", "5000", "--code-dir", str(dirs[tree])]
        runs.append((f"churn-sqlite-{tree}", command))
    return runs


def _stamp(out: Path, text: str) -> None:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with (out / "sitting.log").open("a") as log:
        log.write(f"== {time.strftime('%H:%M:%S', time.gmtime())} load {load} {text}\n")


def run_sitting(dirs: dict[str, Path], out: Path, only: list[str]) -> None:
    for name, command in cases(dirs):
        if only and not any(name.startswith(prefix) for prefix in only):
            continue
        _stamp(out, f"start {name}: {' '.join(command)}")
        with (out / f"{name}.json").open("w") as stdout, (out / f"{name}.err").open("w") as stderr:
            code = subprocess.call(command, cwd=HERE, stdout=stdout, stderr=stderr, env=dict(os.environ))
        _stamp(out, f"end {name} rc={code}")


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text[text.find("{") :])
    except ValueError:
        return None


def crash_table(out: Path) -> list[str]:
    rows = [
        "| fault | database | tree | acked | replies distinct / total | inbound stored | unanswered at the end "
        "| s to exit | `replier stopped` | key use flushed | restart to last reply, s |",
        "|---|---|---|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for fault in ("kill9", "sigterm", "sigterm-sigint"):
        for db in ("sqlite", "postgresql"):
            for tree in ("before", "after"):
                r = _load(out, f"{fault}-{db}-{tree}")
                if r is None:
                    rows.append(f"| {fault} | {db} | {tree} | (no result) |||||||")
                    continue
                exit_s = r.get("seconds_to_exit_after_sigterm", r.get("seconds_to_exit_after_first_signal", ""))
                rows.append(
                    f"| {fault} | {db} | {tree} | {r['acks_received']} | {r['replies_received_distinct']} / "
                    f"{r['replies_received_total']} | {r['inbound_rows_stored']} | {r['inbound_rows_unanswered']} "
                    f"| {exit_s} | {r.get('replier_stopped_logged', '')} | {r.get('key_use_flushed_at_shutdown', '')} "
                    f"| {r.get('seconds_from_restart_to_last_reply', '')} |"
                )
    return rows


def fault_table(out: Path) -> list[str]:
    rows = [
        "| fault | tree | configurator log | replier log | tracebacks cfg / replier | REST answers | chat answers "
        "| /health cfg / replier | after the fault |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bodies = []
    for name in ("outage-postgresql", "outage-sqlite", "disk-full-sqlite"):
        for tree in ("before", "after"):
            r = _load(out, f"{name}-{tree}")
            if r is None:
                rows.append(f"| {name} | {tree} | (no result) |||||||")
                continue
            cfg, rep = r["configurator_log"], r["replier_log"]
            health = r.get("health_during_fault", {})
            codes = " / ".join(str(health.get(who, {}).get("codes", "")) for who in ("configurator", "replier"))
            rows.append(
                f"| {name} | {tree} | {cfg['bytes']:,} B, {cfg['lines']:,} lines | {rep['bytes']:,} B, "
                f"{rep['lines']:,} lines | {cfg['tracebacks']:,} / {rep['tracebacks']:,} | {r['rest_answers']} "
                f"| {r['chat_answers']} | {codes} | {r.get('recovery_after_fault', '')} |"
            )
            for who in ("configurator", "replier"):
                for body, count in health.get(who, {}).get("bodies", {}).items():
                    bodies.append(f"- {name} {tree}, {who} /health x{count}: `{body[:200]}`")
    return [*rows, "", *bodies]


def churn_table(out: Path) -> list[str]:
    rows = []
    for tree in ("before", "after"):
        path = out / f"churn-sqlite-{tree}.json"  # churn prints a table, not JSON
        lines = [line.split() for line in path.read_text().splitlines()[1:]] if path.exists() else []
        rss = [parts[1] for parts in lines if len(parts) >= 3 and parts[0].isdigit()]
        fds = sorted({parts[2] for parts in lines if len(parts) >= 3 and parts[0].isdigit()})
        rows.append(f"| {tree} | {' | '.join(rss) or '(no result)'} | {', '.join(fds)} |")
    return ["| tree | RSS MB after round 0 | 1 | 2 | 3 | 4 | fds |", "|---|---:|---:|---:|---:|---:|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the older tree")
    parser.add_argument("--after", type=Path, default=HERE, help="the newer tree (default: this checkout)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs' outputs")
    parser.add_argument("--only", action="append", default=[], help="run only cases whose name starts so")
    parser.add_argument("--summary-only", action="store_true", help="print the tables of an earlier sitting")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        if args.before is None:
            parser.error("--before is required unless --summary-only")
        run_sitting({"before": args.before.resolve(), "after": args.after.resolve()}, args.out, args.only)
    print("\n".join(["## kill -9 and stops (points 1, 2)", *crash_table(args.out), ""]))
    print("\n".join(["## outages and a full disk (points 3-5)", *fault_table(args.out), ""]))
    print("\n".join(["## churn (point 6)", *churn_table(args.out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
