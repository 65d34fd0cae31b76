"""Latency statistics and the human-readable summary of a run (rich)."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: list[float]) -> dict:
    """count, min, mean, p50, p95, p99, max in milliseconds (None without data)."""
    if not seconds:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "min": round(min(ms), 2),
        "mean": round(sum(ms) / len(ms), 2),
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2),
    }


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_summary(report: dict, console: Console, report_path: str | None = None) -> None:
    p = report["parameters"]
    t = report["totals"]
    lat = report["latency_ms"]
    ok = report["ok"]
    console.rule(f"[bold]integration run {report['run_prefix']}[/bold]")
    console.print(
        f"{p['users']} users x {p['agents']} agents x {p['messages']} messages against "
        f"{p['configurator_url']} and {p['replier_url']} (concurrency {p['concurrency']}); "
        f"messages by {p['generator']}"
    )
    table = Table(title="conversations", box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (
        ("chat", "left"),
        ("template", "left"),
        ("platform", "left"),
        ("replies", "right"),
        ("p50 ms", "right"),
        ("history", "left"),
        ("result", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column != "result")
    shown = report["conversations"][:50]
    agents = max(1, p["agents"])
    for c in shown:
        lats = [x / 1000 for x in c["latencies_ms"]]
        table.add_row(
            f"u{c['index'] // agents}/a{c['index'] % agents}",
            c["template_id"] or "-",
            f"{c['platform']}/{c['kind'][0]}",
            f"{c['received']}/{c['sent']}",
            _fmt(latency_summary(lats)["p50"]) if lats else "-",
            ("ok" if c["history"].get("ok") else "MISMATCH") + f" ({c['history'].get('count') or 0})",
            "[green]ok[/green]" if c["ok"] else f"[red]FAILED[/red] {escape('; '.join(c['errors'])[:80])}",
        )
    console.print(table)
    if len(report["conversations"]) > len(shown):
        console.print(f"... and {len(report['conversations']) - len(shown)} more conversations in the report")
    totals = Table(title="totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("conversations ok", f"{t['conversations_ok']} / {t['conversations']}")
    totals.add_row("replies / messages sent", f"{t['replies_received']} / {t['messages_sent']}")
    totals.add_row("success rate (replies / planned messages)", f"{t['success_rate'] * 100:.1f} %")
    totals.add_row("offline-responder replies", str(t["offline_replies"]))
    totals.add_row(
        "reply latency ms p50 / p95 / p99",
        f"{_fmt(lat['p50'])} / {_fmt(lat['p95'])} / {_fmt(lat['p99'])}  (n={lat['count']}, max {_fmt(lat['max'])})",
    )
    stats_ok = sum(1 for s in report["tenant_stats"] if s["ok"])
    totals.add_row("tenant stats consistent", f"{stats_ok} / {len(report['tenant_stats'])}")
    totals.add_row("duration", f"{report['duration_s']:.1f} s")
    console.print(totals)
    cleanup = report["cleanup"]
    if cleanup.get("mode") == "skipped":
        console.print(
            f"[yellow]cleanup skipped[/yellow]: remove this run later with "
            f"`python -m integration_tests --cleanup-prefix {report['run_prefix']} --database-url URL`"
        )
    else:
        print_counts(cleanup.get("deleted", {}), console, f"cleanup ({cleanup['mode']}): rows deleted")
        state = "[green]complete[/green]" if cleanup.get("complete") else "[red]INCOMPLETE[/red]"
        console.print(f"cleanup {state}; logins afterwards: {cleanup.get('login_status_after')}")
        if cleanup.get("note"):
            console.print(f"[yellow]note[/yellow]: {escape(cleanup['note'])}")
    for error in report["errors"][:20]:
        console.print(f"[red]error[/red]: {escape(error)}", highlight=False)
    if len(report["errors"]) > 20:
        console.print(f"... {len(report['errors']) - 20} more errors in the report")
    if report_path:
        console.print(f"report written to {report_path}")
    console.print("[bold green]PASSED[/bold green]" if ok else "[bold red]FAILED[/bold red]")


def print_counts(counts: dict[str, int], console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, count in sorted(counts.items()):
        table.add_row(name, str(count))
    table.add_row("total", str(sum(counts.values())), style="bold")
    console.print(table)
