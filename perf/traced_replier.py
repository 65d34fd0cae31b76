"""`python -X tracemalloc=1 -m perf.traced_replier`: the replier, plus a memory report on SIGUSR2.

For `perf/churn.py --tracemalloc`: on SIGUSR2 the process writes to `$TRACE_REPORT` (appending) the
top allocation sites (tracemalloc, by line), the frozen-object count of `gc.freeze`, the collector's
counts and the number of objects it tracks per type (top 15), so a growth can be pinned to what holds
it. Not part of the product.
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import sys
import tracemalloc

from replier.__main__ import main


def _report(signum, frame) -> None:
    path = os.environ.get("TRACE_REPORT", "trace_report.txt")
    with open(path, "a") as out:
        out.write(f"=== report: freeze count {gc.get_freeze_count()}, gc counts {gc.get_count()}\n")
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            current, peak = tracemalloc.get_traced_memory()
            out.write(f"traced {current / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)\n")
            for stat in snapshot.statistics("lineno")[:25]:
                out.write(f"  {stat}\n")
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        out.write(f"tracked objects {sum(types.values())}: {types.most_common(15)}\n")


if __name__ == "__main__":
    signal.signal(signal.SIGUSR2, _report)
    sys.exit(main())
