"""Benchmark: what one limit check costs a message or request, in process vs in Redis, same run.

    python -m perf.bench_window_counter [--calls 5000] [--redis-url redis://127.0.0.1:6379/0]

Each call is what `TenantLimiter.admit` does per chat message: one `take` of the agent's and the
tenant's count (limits 0, so every call counts). Three variants, sequential calls:

- `in_process`: `isolation.limits.FixedWindowCounter` (no REDIS_URL);
- `redis_sync`: `isolation.redis_counter.RedisWindowCounter` (the configurator's, from a thread);
- `redis_async`: `AsyncRedisWindowCounter` on an event loop (the replier's).

Printed: microseconds per call and the ratio to in-process. The keys live under a prefix of the
run's own and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis

from isolation.limits import FixedWindowCounter
from isolation.redis_counter import AsyncRedisWindowCounter, RedisWindowCounter, async_client
from testsupport.redis_server import TEST_REDIS_URL, unique_prefix

CHECKS = [(("agent", "ten_bench", "agt_bench"), 0), (("tenant", "ten_bench"), 0)]


def per_call_sync(counter, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        counter.take(CHECKS, 60)
    return (time.perf_counter() - started) / calls


async def per_call_async(url: str, prefix: str, calls: int) -> float:
    counter = AsyncRedisWindowCounter(async_client(url), prefix)
    try:
        started = time.perf_counter()
        for _ in range(calls):
            await counter.take(CHECKS, 60)
        return (time.perf_counter() - started) / calls
    finally:
        await counter.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--redis-url", default=TEST_REDIS_URL)
    args = parser.parse_args()
    prefix = unique_prefix()
    client = redis.Redis.from_url(args.redis_url)
    try:
        results = {
            "in_process": per_call_sync(FixedWindowCounter(), args.calls),
            "redis_sync": per_call_sync(RedisWindowCounter(client, prefix), args.calls),
            "redis_async": asyncio.run(per_call_async(args.redis_url, prefix, args.calls)),
        }
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    base = results["in_process"]
    print(f"{'variant':12s} {'us/call':>9s} {'x in_process':>13s}   ({args.calls} sequential calls)")
    for name, seconds in results.items():
        print(f"{name:12s} {seconds * 1e6:9.1f} {seconds / base:13.0f}")


if __name__ == "__main__":
    main()
