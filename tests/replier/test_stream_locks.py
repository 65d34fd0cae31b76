"""replier/stream_locks.py against a real Redis: one holder per stream, the last owner remembered,
expiry as the bound, and answering without the lock (one warning) while Redis fails."""

from __future__ import annotations

import asyncio
import logging

import pytest

from replier.stream_locks import NoStreamLocks, StreamLocks
from testsupport.redis_server import PrivateRedis, require_redis, unique_prefix

KEY = ("t_1", "agt_1", "qq", "cs_1")


@pytest.fixture
def redis_url() -> str:
    return require_redis()


def test_one_holder_at_a_time_and_the_takeover_is_reported(redis_url):
    async def scenario():
        prefix = unique_prefix()
        first, second = StreamLocks(redis_url, prefix, "r1", 5), StreamLocks(redis_url, prefix, "r2", 5)
        order: list[str] = []

        async def answer(locks: StreamLocks, name: str, pause: float) -> bool:
            async with locks.hold(KEY) as moved:
                order.append(f"{name} in")
                await asyncio.sleep(pause)
                order.append(f"{name} out")
                return moved

        a = asyncio.create_task(answer(first, "r1", 0.2))
        await asyncio.sleep(0.05)
        moved_second = await answer(second, "r2", 0)
        moved_first = await a
        assert order == ["r1 in", "r1 out", "r2 in", "r2 out"]
        assert (moved_first, moved_second) == (False, True)  # r2 took over a stream r1 answered last
        assert second.waits == 1
        async with second.hold(KEY) as moved:  # r2 answered last itself: its cache is good
            assert moved is False
        async with first.hold(("t_1", "agt_1", "qq", "cs_other")) as moved:  # another stream: free
            assert moved is False
        for locks in (first, second):
            await locks.aclose()

    asyncio.run(scenario())


def test_a_lock_left_by_a_dead_replier_expires(redis_url):
    async def scenario():
        prefix = unique_prefix()
        dead, alive = StreamLocks(redis_url, prefix, "r1", 0.3), StreamLocks(redis_url, prefix, "r2", 0.3)
        holder = dead.hold(KEY)
        await holder.__aenter__()  # never released: the replier "died" holding it
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with alive.hold(KEY):
            waited = loop.time() - started
        assert alive.waits == 1 and waited > 0.1
        for locks in (dead, alive):
            await locks.aclose()

    asyncio.run(scenario())


def test_redis_failing_means_answering_without_the_lock(caplog):
    private = PrivateRedis().start()

    async def scenario():
        locks = StreamLocks(private.url, unique_prefix(), "r1", 5)
        with caplog.at_level(logging.WARNING, logger="replier"):
            async with locks.hold(KEY) as moved:
                assert moved is False
                private.stop()  # gone while the answer runs: the release fails, the lock expires
            async with locks.hold(KEY) as moved:  # gone before: answered without the lock
                assert moved is False
        await locks.aclose()

    try:
        asyncio.run(scenario())
    finally:
        private.stop()
    warnings = [r for r in caplog.records if "stream locks: Redis failed" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per message


def test_without_redis_there_is_nothing_to_hold():
    async def scenario():
        locks = NoStreamLocks()
        async with locks.hold(KEY) as moved:
            assert moved is False
        await locks.aclose()

    asyncio.run(scenario())
