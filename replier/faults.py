"""Database outages in the replier: a retryable chat error for the sender, one log line per kind and interval.

A message that meets an outage (`isolation.faults.classify`: the database is unavailable or the disk is
full) is answered with the fault's code (`database_unavailable` or `storage_full`) and
`retryable: true` in either protocol, and the connection stays open: the client sends it again later
and it is answered then (the same message id is never answered twice, the database decides). Logging
goes through one `FaultLog`, so an outage at 100 messages a second is a few lines, not a traceback each.
"""

from __future__ import annotations

import logging

from isolation.faults import Fault, handle
from isolation.logthrottle import FaultLog
from replier.connections import Connection
from replier.outbox import Outbox
from replier.protocol import Inbound

log = logging.getLogger("replier")

FAULT_LOG_SECONDS = 10.0
fault_log = FaultLog(log, FAULT_LOG_SECONDS)


def report(exc: BaseException, what: str) -> Fault | None:
    """The outage `exc` reports, logged (throttled); None when it is not an outage (then nothing is logged)."""
    fault = handle(exc)
    if fault is not None:
        fault_log.report(fault, what, exc)
    return fault


async def reply_fault(outbox: Outbox, conn: Connection | None, inbound: Inbound, exc: BaseException) -> bool:
    """Tell the sender of `inbound` to retry when `exc` is an outage; False (nothing sent) otherwise."""
    fault = report(exc, "chat message")
    if fault is None:
        return False
    if conn is not None:
        await outbox.reply_error(conn, inbound, fault.code, fault.message, retryable=True)
    return True
