"""What row-level security itself costs on PostgreSQL, below peewee and the managers.

    python -m perf.bench_rls_raw

Seeds 20 tenants / 20,000 messages, then runs the same prepared history query through plain psycopg as
the schema owner (no RLS) and as the application role (RLS policy applied), with identical round trips
(`BEGIN`, `set_config`, 5 queries, `COMMIT`), 7 interleaved rounds; prints the median per query.
"""

from __future__ import annotations

import statistics
import time

import psycopg

from perf import bench_isolation
from testsupport.databases import _conninfo, provision_database

QUERY = (
    "SELECT * FROM messages WHERE tenant_id=%s AND agent_id=%s AND platform=%s AND chat_stream_id=%s "
    "ORDER BY created_at DESC, id DESC LIMIT 20"
)


def main() -> int:
    with provision_database("postgresql") as database:
        contexts = bench_isolation.seed(database.admin_url, 20, 20_000)
        connections = {
            "owner (no RLS)": psycopg.connect(_conninfo(database.admin_url), autocommit=True),
            "application role (RLS)": psycopg.connect(_conninfo(database.url), autocommit=True),
        }
        samples: dict[str, list[float]] = {label: [] for label in connections}
        for _ in range(7):
            for label, conn in connections.items():
                begin = time.perf_counter()
                for i in range(100):
                    ctx = contexts[i % len(contexts)]
                    with conn.transaction():
                        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (ctx.tenant_id,))
                        for _ in range(5):
                            conn.execute(
                                QUERY, (ctx.tenant_id, ctx.agent_id, ctx.platform, ctx.chat_stream_id)
                            ).fetchall()
                samples[label].append((time.perf_counter() - begin) / 500)
        for conn in connections.values():
            conn.close()
        medians = {label: statistics.median(values) for label, values in samples.items()}
        for label, value in medians.items():
            print(f"{label:24s} {value * 1e6:7.0f} us per query")
        owner, app = medians.values()
        print(f"ratio {app / owner:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
