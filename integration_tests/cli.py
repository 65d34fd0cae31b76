"""`python -m integration_tests`: the end-to-end suite against running MaiTenant backends.

    python -m integration_tests --users 3 --agents 2 --messages 5 --report out.json
    python -m integration_tests --cleanup-prefix it_20261122031425_532a26_ --database-url sqlite:///data/maitenant.db

Exit status: 0 when every conversation got every reply, the stored history and tenant stats match
and cleanup left nothing of the run; 1 otherwise; 2 for invalid arguments. See docs/INTEGRATION.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from integration_tests.report import print_counts, print_summary
from integration_tests.runner import Run, RunOptions, delete_prefix_in_database

SAFE_PREFIX = "it_"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m integration_tests",
        description="End-to-end run against running MaiTenant backends: register users through the configurator "
        "API, create agents and API keys, chat over maim_message with the replier, verify stored history and "
        "stats, clean up, report.",
        epilog="Details and the report format: docs/INTEGRATION.md",
    )
    parser.add_argument("--users", type=_positive, default=3, help="users (tenants) to register (default 3)")
    parser.add_argument("--agents", type=_positive, default=2, help="agents (and API keys) per user (default 2)")
    parser.add_argument("--messages", type=_positive, default=5, help="user messages per conversation (default 5)")
    parser.add_argument(
        "--concurrency", type=_positive, default=10, help="conversations (and setup calls) at once (default 10)"
    )
    parser.add_argument(
        "--configurator-url",
        default=os.environ.get("MAITENANT_CONFIGURATOR_URL", "http://127.0.0.1:8000"),
        help="configurator base URL (default $MAITENANT_CONFIGURATOR_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--replier-url",
        default=os.environ.get("MAITENANT_REPLIER_URL", "ws://127.0.0.1:8095/ws"),
        help="replier maim_message URL (default $MAITENANT_REPLIER_URL or ws://127.0.0.1:8095/ws)",
    )
    parser.add_argument(
        "--cleanup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delete everything the run created at the end (default: yes)",
    )
    parser.add_argument("--report", metavar="PATH", help="write the JSON report here")
    parser.add_argument(
        "--cleanup-prefix",
        metavar="PREFIX",
        help="only remove leftovers of earlier runs: accounts whose username starts with PREFIX (a run id, e.g. "
        "it_20261122031425_532a26_) and the tenants they alone belong to (needs --database-url)",
    )
    parser.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for each reply (default 30)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="database of the servers (default $DATABASE_URL): cleanup then also sweeps the run prefix in the "
        "database (catches leftovers of interrupted runs); required by --cleanup-prefix",
    )
    parser.add_argument(
        "--database-app-role",
        default=os.environ.get("DATABASE_APP_ROLE") or None,
        help="PostgreSQL role the cleanup switches to (default $DATABASE_APP_ROLE, else isolation's default)",
    )
    parser.add_argument(
        "--password", help="password of every account the run registers (default: random, never written)"
    )
    parser.add_argument("--transcripts", action="store_true", help="include every conversation's texts in the report")
    parser.add_argument(
        "--llm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write user messages with the LLM of LLM_PROVIDER/LLM_BASE_URL/LLM_MODEL/LLM_API_KEY when set "
        "(default: yes; topic templates otherwise)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"allow a --cleanup-prefix shorter than a run id or not starting with {SAFE_PREFIX!r}",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    return parser


def _quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """maim_message's connection tasks log a CancelledError traceback when a client stops; drop those."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _execute(run: Run) -> dict:
    asyncio.get_running_loop().set_exception_handler(_quiet_cancelled)
    return await run.execute()


def write_report(report: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cleanup_prefix(args: argparse.Namespace, console: Console) -> int:
    from isolation.cleanup import check_prefix

    prefix = args.cleanup_prefix
    try:
        check_prefix(prefix, force=args.force)  # empty, or shorter than a run id without --force: exit 2
    except ValueError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    if not args.database_url:
        console.print("error: --cleanup-prefix needs --database-url (or DATABASE_URL) of the servers' database")
        return 2
    if not prefix.startswith(SAFE_PREFIX) and not args.force:
        console.print(f"error: prefix {prefix!r} does not start with {SAFE_PREFIX!r}; pass --force if you mean it")
        return 2
    try:
        result = delete_prefix_in_database(prefix, args.database_url, args.database_app_role, force=args.force)
    except Exception as exc:  # the database is unreachable or has another schema: say so, exit 1
        console.print(f"error: prefix cleanup failed: {type(exc).__name__}: {exc}", markup=False)
        return 1
    print_counts(result["deleted"], console, f"rows deleted (prefix {prefix})")
    if result["accounts_left"]:
        console.print(
            f"accounts left (the only owners of tenants with other members): {result['accounts_left']}", markup=False
        )
    if args.report:
        write_report({"cleanup_prefix": prefix, **result, "ok": not result["accounts_left"]}, args.report)
        console.print(f"report written to {args.report}")
    return 0 if not result["accounts_left"] else 1


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = console or Console()
    logging.getLogger("maim_message").setLevel(logging.WARNING)
    if args.cleanup_prefix is not None:  # an empty prefix is refused there, never taken for "no prefix"
        return cleanup_prefix(args, console)
    options = RunOptions(
        users=args.users,
        agents=args.agents,
        messages=args.messages,
        concurrency=args.concurrency,
        configurator_url=args.configurator_url,
        replier_url=args.replier_url,
        cleanup=args.cleanup,
        timeout=args.timeout,
        database_url=args.database_url,
        database_app_role=args.database_app_role,
        password=args.password,
        transcripts=args.transcripts,
        use_llm=args.llm,
    )
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    run = Run(options, progress=progress)
    console.print(f"run prefix {run.prefix}")
    try:
        with progress:
            asyncio.run(_execute(run))
    except KeyboardInterrupt:
        if run.report is None:
            console.print(f"interrupted; leftovers can be removed with --cleanup-prefix {run.prefix}", markup=False)
            return 130
    return finish(run.report, args, console)


def finish(report: dict, args: argparse.Namespace, console: Console) -> int:
    """Write the report, print the summary, pick the exit status.

    (A function of its own: on Python 3.11, coverage loses the lines that follow `asyncio.run` in the
    frames that were on the stack while tasks got cancelled — CPython issue 106749.)
    """
    if args.report:
        write_report(report, args.report)
    print_summary(report, console, args.report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # pragma: no cover - `python -m integration_tests` goes through __main__.py
    sys.exit(main())
