"""What both locust files share: their command-line options and the seed rows, one per simulated user.

Options (also settable as environment variables, like locust's own):

    --seed-csv PATH      (LOAD_SEED_CSV, default perf/seed.csv)   written by `python -m perf.seed`
    --wait-min SECONDS   (LOAD_WAIT_MIN)  think time between a user's tasks, uniform in [min, max]
    --wait-max SECONDS   (LOAD_WAIT_MAX)
    --reply-timeout S    (LOAD_REPLY_TIMEOUT, default 10)  replier: a reply later than this is a failure
    --sio-client KIND    (LOAD_SIO_CLIENT, raw|socketio, default raw)  replier client implementation
    --no-ack             (LOAD_NO_ACK)  replier: do not ack replies (maim's own client acks them)

Row assignment: the N-th user started in a process takes row N (wrapping around when there are more
users than rows); with `--processes K` worker W takes rows W, W+K, W+2K, ... so workers do not share
rows while there are enough of them.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

from locust import events

from perf.seed import read_csv

DEFAULT_SEED_CSV = str(Path(__file__).resolve().parent / "seed.csv")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("MaiTenant load options")
    group.add_argument(
        "--seed-csv", default=DEFAULT_SEED_CSV, env_var="LOAD_SEED_CSV", help="python -m perf.seed output"
    )
    group.add_argument("--wait-min", type=float, default=None, env_var="LOAD_WAIT_MIN", help="min think time (s)")
    group.add_argument("--wait-max", type=float, default=None, env_var="LOAD_WAIT_MAX", help="max think time (s)")
    group.add_argument("--reply-timeout", type=float, default=10.0, env_var="LOAD_REPLY_TIMEOUT", help="seconds")
    group.add_argument(
        "--sio-client", choices=["raw", "socketio"], default="raw", env_var="LOAD_SIO_CLIENT", help="replier client"
    )
    group.add_argument("--no-ack", action="store_true", default=False, env_var="LOAD_NO_ACK", help="do not ack replies")


_lock = threading.Lock()
_rows: list[dict[str, str]] | None = None
_rows_path: str | None = None
_counter = itertools.count()


def options(environment):
    """The parsed options (locust fills `parsed_options` for headless and UI runs)."""
    return environment.parsed_options


def _workers(environment) -> tuple[int, int]:
    runner = environment.runner
    index = getattr(runner, "worker_index", None)
    if index is None or index < 0:
        return 0, 1
    processes = getattr(environment.parsed_options, "processes", None) or 1
    if processes < 0:
        processes = os.cpu_count() or 1
    return index, max(processes, index + 1)


def take_row(environment) -> dict[str, str]:
    """The next seed row for a new simulated user of this process."""
    global _rows, _rows_path
    path = options(environment).seed_csv
    with _lock:
        if _rows is None or _rows_path != path:
            _rows, _rows_path = read_csv(path), path
        worker, workers = _workers(environment)
        return _rows[(next(_counter) * workers + worker) % len(_rows)]


def think_time(environment, default_min: float, default_max: float) -> float:
    import random

    parsed = options(environment)
    low = parsed.wait_min if parsed.wait_min is not None else default_min
    high = parsed.wait_max if parsed.wait_max is not None else default_max
    return random.uniform(low, max(low, high))


# locust's CSV writer snapshots the stats once a second and does not write again at shutdown, so its
# `_stats.csv` can miss the last second. At `quit` (after the users stopped, before locust exits) the
# final numbers are written next to it as `<prefix>_final_stats.csv` / `_final_failures.csv` /
# `_final_exceptions.csv` (same columns); perf/load_run.py reads those.
_environment = None


@events.init.add_listener
def _remember_environment(environment, **_kwargs) -> None:
    global _environment
    _environment = environment


@events.quit.add_listener
def _write_final_csv(**_kwargs) -> None:
    import csv

    from locust.runners import WorkerRunner
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    environment = _environment
    prefix = getattr(getattr(environment, "parsed_options", None), "csv_prefix", None)
    if environment is None or not prefix or isinstance(environment.runner, WorkerRunner):
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, method in (("stats", writer.requests_csv), ("failures", writer.failures_csv)):
        with open(f"{prefix}_final_{suffix}.csv", "w", newline="") as handle:
            method(csv.writer(handle))
    with open(f"{prefix}_final_exceptions.csv", "w", newline="") as handle:
        writer.exceptions_csv(csv.writer(handle))
