"""Benchmark: the database work of one `GET /api/v1/agents`, without HTTP, two ways, same run.

    python -m perf.bench_agent_page --database sqlite
    python -m perf.bench_agent_page --database postgresql --threads 1 8

Each "request" does what the route does inside `Principal.session()`: take a connection, open the
tenant's unit of work (on PostgreSQL each statement sent behind its tenant binding), check the caller's
membership and sign-in session (one statement), read a page of 20 agents, and turn it into the JSON body:

- `rows`: `agents.list_with_key_flags()` (rows decoded into Python) and `orjson.dumps` of the page;
- `page_json`: `agents.page_json()` (the page built as JSON by the database) spliced in with
  `orjson.Fragment`; what the route runs.

Printed: requests/s per variant and thread count, and the ratio page_json/rows. It also shows the
ceiling the database path puts on the HTTP benchmark (`perf/bench_configurator.py`).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import orjson

from isolation import IsolationContext, Scoped, system
from isolation import db as isolation_db
from isolation.ids import utcnow
from testsupport.databases import provision_database

SESSION = "bench-session"


def _seed(agents: int) -> tuple[IsolationContext, str]:
    account = system.create_account("bench", "bench@example.com", "not-a-real-hash")
    tenant = system.create_tenant("bench", account["id"])
    ctx = IsolationContext(tenant["id"])
    Scoped(ctx).refresh_tokens.issue("bench-jti", account["id"], utcnow() + timedelta(days=1), session_id=SESSION)
    templates = system.list_templates()
    for i in range(agents):
        template = templates[i % len(templates)]
        Scoped(ctx).agents.create(name=f"agent {i:02d}", persona=template["persona"], config=template["config"], llm={})
    return ctx, account["id"]


def _request(real, ctx: IsolationContext, account_id: str, body: Callable[[Scoped], bytes]) -> bytes:
    # As the configurator's `Principal.session()` does: the connection, then the tenant's unit of work.
    with isolation_db.connection(), isolation_db.unit_of_work(ctx.tenant_id):
        scoped = Scoped(ctx)
        scoped.memberships.get_with_session(account_id, SESSION)
        return body(scoped)


def _rows(scoped: Scoped) -> bytes:
    rows = scoped.agents.list_with_key_flags(limit=51)
    items = rows[:50]
    return orjson.dumps({"items": items, "limit": 50, "offset": 0, "next_offset": None}, option=orjson.OPT_NAIVE_UTC)


def _page_json(scoped: Scoped) -> bytes:
    items, more = scoped.agents.page_json(limit=50)
    body = {"items": orjson.Fragment(items), "limit": 50, "offset": 0, "next_offset": 50 if more else None}
    return orjson.dumps(body)


def _rate(real, ctx, account_id, body, threads: int, seconds: float) -> float:
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        while time.perf_counter() < stop:
            _request(real, ctx, account_id, body)
            done[slot] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sum(done) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per variant and thread count")
    args = parser.parse_args(argv)

    with provision_database(args.database) as provisioned:
        real = isolation_db.configure(provisioned.url, app_role=provisioned.app_role)
        with real.connection_context():
            ctx, account_id = _seed(args.agents)
        # Same agents both ways (timestamps differ only in text; tests/isolation/test_agent_pages.py
        # checks the pages field by field).
        by_rows = orjson.loads(_request(real, ctx, account_id, _rows))["items"]
        by_json = orjson.loads(_request(real, ctx, account_id, _page_json))["items"]
        if [item["id"] for item in by_rows] != [item["id"] for item in by_json] or len(by_rows) != args.agents:
            raise SystemExit("the two variants disagree: not benchmarking")
        print(f"database={args.database} agents={args.agents} seconds={args.seconds}")
        for threads in args.threads:
            rates = {}
            for name, body in (("rows", _rows), ("page_json", _page_json)):
                _rate(real, ctx, account_id, body, threads, min(0.5, args.seconds))  # warm-up
                rates[name] = _rate(real, ctx, account_id, body, threads, args.seconds)
            print(
                f"threads={threads:<3} rows {rates['rows']:>8.0f} req/s   page_json {rates['page_json']:>8.0f} req/s"
                f"   ratio page_json/rows {rates['page_json'] / rates['rows']:.2f}"
            )
        isolation_db.close_database()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
