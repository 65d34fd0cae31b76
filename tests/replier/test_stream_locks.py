"""replier/stream_locks.py against a real Redis: one holder per stream, taken in arrival order, the
last owner remembered, expiry as the bound, dead waiters dropped, and answering without the lock (one
warning) while Redis fails."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from replier.stream_locks import STALE_WAITER_SECONDS, NoStreamLocks, StreamLocks, Turn
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


def test_the_lock_goes_to_the_message_that_arrived_first_whichever_instance_polls_first(redis_url):
    """r1 answers; r2 and r3 wait with messages that arrived at 2 and 3, r1 has its next one (arrived
    at 1) queued behind the one it answers, and r4's arrived at 0.5 but only asks once r1 is busy
    with its second. The lock goes 1 (r1, entered when it gave the lock back), 0.5, 2, 3."""

    async def scenario():
        prefix = unique_prefix()
        instances = {name: StreamLocks(redis_url, prefix, name, 5) for name in ("r1", "r2", "r3", "r4")}
        order: list[str] = []
        first_done = asyncio.Event()

        async def answer(name: str, arrived: float, pause: float, following: Turn | None = None) -> None:
            async with instances[name].hold(KEY, Turn(arrived), lambda: following):
                order.append(f"{name}@{arrived}")
                await asyncio.sleep(pause)

        r1_next = Turn(1.0)

        async def r1() -> None:
            await answer("r1", 0.0, 0.2, following=r1_next)
            first_done.set()
            async with instances["r1"].hold(KEY, r1_next):
                order.append("r1@1.0")
                await asyncio.sleep(0.1)

        async def r4() -> None:
            await first_done.wait()
            await answer("r4", 0.5, 0)

        tasks = [asyncio.create_task(r1())]
        await asyncio.sleep(0.05)  # r1 holds the lock
        tasks += [asyncio.create_task(answer("r3", 3.0, 0)), asyncio.create_task(answer("r2", 2.0, 0))]
        tasks.append(asyncio.create_task(r4()))
        await asyncio.gather(*tasks)
        assert order == ["r1@0.0", "r1@1.0", "r4@0.5", "r2@2.0", "r3@3.0"]
        for locks in instances.values():
            await locks.aclose()

    asyncio.run(scenario())


def test_a_waiter_that_stops_asking_is_dropped_and_a_cancelled_one_leaves_at_once(redis_url):
    """A waiter at the head that stops polling (its replier died) holds the queue for
    STALE_WAITER_SECONDS, not for ever; a cancelled waiter (shutdown) leaves the queue at once."""

    async def scenario():
        prefix = unique_prefix()
        holder, dying, cancelled, patient = (StreamLocks(redis_url, prefix, n, 30) for n in ("h", "d", "c", "p"))
        loop = asyncio.get_running_loop()
        holding = holder.hold(KEY, Turn(0.0))
        await holding.__aenter__()
        keys = dying._keys(KEY)
        # "c" (arrived at 0.5) waits and is cancelled: it leaves the queue, so it cannot hold up "p".
        waiting = asyncio.create_task(cancelled.hold(KEY, Turn(0.5)).__aenter__())
        await asyncio.sleep(0.1)
        assert len(await holder._client.zrange(keys[2], 0, -1)) == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert await holder._client.zrange(keys[2], 0, -1) == []
        # "d" enters the queue (arrived at 1) with one poll, then its replier dies.
        assert (await dying._take(keys=keys, args=["d:x", 30_000, "1.0", 2000, 60_000]))[0] == 0
        await holding.__aexit__(None, None, None)
        started = loop.time()
        async with patient.hold(KEY, Turn(2.0)):
            waited = loop.time() - started
        assert STALE_WAITER_SECONDS - 0.5 < waited < STALE_WAITER_SECONDS + 2
        for locks in (holder, dying, cancelled, patient):
            await locks.aclose()

    asyncio.run(scenario())


def test_a_waiter_cancelled_at_any_point_stops_at_once_and_leaves_nothing_behind(redis_url):
    """Shutdown cancels waiting streams. Cancelled at any point (also while its script is on the wire,
    where redis-py swallows the CancelledError) a waiter stops at once: it neither waits on until the
    lock's ttl nor leaves its entry in the queue or a lock behind."""

    async def scenario():
        prefix = unique_prefix()
        holder, waiter = StreamLocks(redis_url, prefix, "h", 30), StreamLocks(redis_url, prefix, "w", 30)
        keys = holder._keys(KEY)
        holding = holder.hold(KEY, Turn(0.0))
        await holding.__aenter__()
        slowest = 0.0
        for n in range(150):
            task = asyncio.create_task(waiter.hold(KEY, Turn(1.0)).__aenter__())
            await asyncio.sleep((n % 13) / 1000)
            started = time.perf_counter()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            slowest = max(slowest, time.perf_counter() - started)
            assert await holder._client.zrange(keys[2], 0, -1) == []
        assert slowest < 1.0
        await holding.__aexit__(None, None, None)
        # The lock is free: nothing of the cancelled waiters holds it.
        assert await holder._client.get(keys[0]) is None
        for locks in (holder, waiter):
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
