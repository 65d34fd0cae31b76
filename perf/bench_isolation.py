"""Benchmark: scoped-manager history queries vs hand-written peewee queries with the same filters.

    python -m perf.bench_isolation [--tenants 100] [--messages 100000] [--queries 3000] [--databases sqlite postgresql]

Seeds `--messages` messages over `--tenants` tenants (one agent and 10 chat streams each) in a fresh
database per kind, then times, in the same process and run:

* baseline  - a hand-written peewee query (`Message.select().where(tenant, agent, platform, stream)...`)
              run by the schema owner: no row-level security, no tenant binding;
* scoped    - `Scoped(ctx).messages.history(limit)` as the application role (on PostgreSQL the RLS
              policy applied, and outside a transaction the statement sent in one pipeline behind
              its own `set_config('app.tenant_id', ...)`: one round trip, no BEGIN/COMMIT);
* both again in three shapes: one query per transaction; all queries (random tenants) in one
  transaction, which makes the scoped side re-bind the tenant almost every query; and requests of
  5 queries for one tenant, a transaction each (how a configurator route uses the database).

Prints each time per query and the ratio scoped / baseline. This file is the one module outside
`isolation/` allowed to use a model directly: the unscoped baseline is the point of the comparison.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime, timedelta

from isolation import IsolationContext, Scoped
from isolation import db as isolation_db
from isolation.db import make_database
from isolation.ids import new_id
from isolation.models import Message  # the unscoped baseline needs the model itself
from isolation.system import create_account, create_tenant
from testsupport.databases import PostgresUnavailable, provision_database

HISTORY_LIMIT = 20


def seed(url_admin: str, tenants: int, messages: int) -> list[IsolationContext]:
    """Bulk-load as the owner (seeding speed is not what is measured); returns one chat ctx per stream."""
    owner = make_database(url_admin, admin=True)
    isolation_db.database.initialize(owner)
    contexts: list[IsolationContext] = []
    rows: list[dict] = []
    per_stream = max(1, messages // (tenants * 10))
    start = datetime(2026, 1, 1)
    for t in range(tenants):
        account = create_account(f"bench_u{t}", f"bench{t}@example.test", "x")
        tenant = create_tenant(f"bench_t{t}", account["id"])
        ctx = IsolationContext(tenant["id"])
        agent = Scoped(ctx).agents.create(name="bench", persona={}, config={}, llm={})
        for s in range(10):
            chat = ctx.child(agent_id=agent["id"], platform="qq")
            stream = Scoped(chat).chat_streams.get_or_create(group_id=f"g{s}")
            full = chat.child(chat_stream_id=stream["id"])
            contexts.append(full)
            for i in range(per_stream):
                rows.append(
                    {
                        "tenant_id": full.tenant_id,
                        "id": new_id("msg"),
                        "agent_id": full.agent_id,
                        "platform": full.platform,
                        "chat_stream_id": full.chat_stream_id,
                        "message_id": f"m{i}",
                        "direction": "in" if i % 2 == 0 else "out",
                        "sender_user_id": "u1",
                        "text": f"message {i} of stream {s}",
                        "segments": [{"type": "text", "data": f"message {i}"}],
                        "created_at": start + timedelta(seconds=i),
                    }
                )
    with owner.atomic():
        for i in range(0, len(rows), 2000):
            Message.insert_many(rows[i : i + 2000]).execute()
    owner.execute_sql("ANALYZE")
    owner.close()
    print(f"  seeded {len(rows):,} messages in {len(contexts):,} streams of {tenants} tenants", flush=True)
    return contexts


def baseline_history(ctx: IsolationContext) -> list[dict]:
    query = (
        Message.select()
        .where(
            (Message.tenant_id == ctx.tenant_id)
            & (Message.agent_id == ctx.agent_id)
            & (Message.platform == ctx.platform)
            & (Message.chat_stream_id == ctx.chat_stream_id)
        )
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(HISTORY_LIMIT)
        .dicts()
    )
    rows = list(query)
    rows.reverse()
    return rows


def scoped_history(ctx: IsolationContext) -> list[dict]:
    return Scoped(ctx).messages.history(HISTORY_LIMIT)


def timed_pair(base_fn, base_db, scoped_fn, scoped_db, contexts, order, in_transaction: bool, rounds: int = 7):
    """Median seconds per query of baseline and scoped, rounds interleaved (A B A B ...).

    Interleaving keeps the ratio honest on a busy machine: drift hits both sides alike. `order` is a
    list of indices (one query each) or, for requests, a list of lists (one transaction each).
    """
    samples: dict[str, list[float]] = {"baseline": [], "scoped": []}
    queries = sum(len(r) for r in order) if order and isinstance(order[0], list) else len(order)
    for _ in range(rounds):
        for label, fn, db in (("baseline", base_fn, base_db), ("scoped", scoped_fn, scoped_db)):
            isolation_db.database.initialize(db)
            begin = time.perf_counter()
            if order and isinstance(order[0], list):
                for request in order:
                    # each side opens a request the way its code would: a plain transaction for the
                    # baseline, `unit_of_work(tenant)` when scoped (on PostgreSQL no transaction for
                    # reads: each statement carries its binding, isolation/db.py)
                    tenant = contexts[request[0]].tenant_id
                    with db.atomic() if label == "baseline" else isolation_db.unit_of_work(tenant):
                        for i in request:
                            fn(contexts[i])
            elif in_transaction:
                with db.atomic():
                    for i in order:
                        fn(contexts[i])
            else:
                for i in order:
                    fn(contexts[i])
            samples[label].append((time.perf_counter() - begin) / queries)
    return statistics.median(samples["baseline"]), statistics.median(samples["scoped"])


def requests_of_one_tenant(contexts: list[IsolationContext], count: int, per_request: int = 5) -> list[list[int]]:
    """`count` requests, each `per_request` history queries of random streams of one random tenant."""
    by_tenant: dict[str, list[int]] = {}
    for i, ctx in enumerate(contexts):
        by_tenant.setdefault(ctx.tenant_id, []).append(i)
    tenants = sorted(by_tenant)
    rng = random.Random(11)
    return [[rng.choice(by_tenant[rng.choice(tenants)]) for _ in range(per_request)] for _ in range(count)]


def run(kind: str, tenants: int, messages: int, queries: int) -> dict[str, float] | None:
    try:
        provisioned = provision_database(kind)
        database = provisioned.__enter__()
    except PostgresUnavailable as exc:
        print(f"{kind}: skipped ({exc})")
        return None
    try:
        print(f"{kind}:", flush=True)
        contexts = seed(database.admin_url, tenants, messages)
        order = [random.Random(i).randrange(len(contexts)) for i in range(queries)]
        owner = make_database(database.admin_url, admin=True)
        app = make_database(database.url, app_role=database.app_role)

        def use(db):
            isolation_db.database.initialize(db)

        # same answers first: the comparison is only fair if both return the same rows
        use(owner)
        expected = [baseline_history(contexts[i]) for i in order[:50]]
        use(app)
        got = [scoped_history(contexts[i]) for i in order[:50]]
        assert [[r["id"] for r in rows] for rows in expected] == [[r["id"] for r in rows] for rows in got]

        results = {}
        timed_pair(baseline_history, owner, scoped_history, app, contexts, order[:200], False, rounds=1)  # warm-up
        results["baseline"], results["scoped"] = timed_pair(
            baseline_history, owner, scoped_history, app, contexts, order, in_transaction=False
        )
        results["baseline_tx"], results["scoped_tx"] = timed_pair(
            baseline_history, owner, scoped_history, app, contexts, order, in_transaction=True
        )
        requests = requests_of_one_tenant(contexts, max(1, len(order) // 5))
        results["baseline_req"], results["scoped_req"] = timed_pair(
            baseline_history, owner, scoped_history, app, contexts, requests, in_transaction=True
        )
        owner.close()
        app.close()
        if hasattr(app, "close_all"):
            app.close_all()
        for label, base, scoped in (
            ("own transaction per query", results["baseline"], results["scoped"]),
            ("one transaction, mixed tenants", results["baseline_tx"], results["scoped_tx"]),
            ("requests: 5 queries, 1 tenant", results["baseline_req"], results["scoped_req"]),
        ):
            print(
                f"  {label:30s} baseline {base * 1e6:8.1f} us   scoped {scoped * 1e6:8.1f} us   "
                f"ratio {scoped / base:5.2f}"
            )
        return results
    finally:
        provisioned.__exit__(*sys.exc_info())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args(argv)
    print(
        f"history of the last {HISTORY_LIMIT} messages; {args.tenants} tenants, {args.messages:,} messages, "
        f"{args.queries} queries x 7 interleaved rounds (median)"
    )
    for kind in args.databases:
        run(kind, args.tenants, args.messages, args.queries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
