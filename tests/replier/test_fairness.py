"""Noisy neighbour: one tenant's hanging, failing or slow model cannot slow another tenant's replies.

Tenant A (20 clients) and tenant B (5 clients) use the SAME provider (same base URL, no key), the
local OpenAI-compatible test double `FakeOpenAI` (tests/replier/fake_openai.py), which picks its
behaviour by model name. B's p95 is measured alone right before each phase, then while A misbehaves, in the same test
(the ratio assertion issue 13 asks for). Whether A's breaker stops calling its model is counted at the
fake server, not timed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
from fake_openai import FakeOpenAI
from replier_support import ReplierProcess, make_tenant, wait_for

from isolation import Scoped
from perf.sio_loadgen import envelope, open_socket
from replier.answer import FALLBACK_REPLY
from testsupport.servers import UNLIMITED_TENANTS

B_CLIENTS = 5
B_MESSAGES = 20  # per client and phase: 100 samples for B's p95
A_CLIENTS = 20
# A's users wait this long after each reply before their next message. Without it, once A's breaker
# answers at once, A's clients turn into a message flood (hundreds a second) that loads the replier's
# CPU and database: what the per-tenant message rate limits are for, not the LLM capacity tested here.
A_THINK_SECONDS = 1.0


def _llm(fake: FakeOpenAI, model: str, timeout: float) -> dict:
    return {"provider": "openai", "base_url": fake.base_url, "model": model, "timeout_seconds": timeout}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def _reply_text(ws, timeout: float = 60.0) -> str:
    """The text of the next reply on `ws` (acks, pings and other events skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        packet = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if packet == "2":
            await ws.send("3")
            continue
        if not packet.startswith("42"):
            continue
        data = json.loads(packet[2:])[1]
        if isinstance(data, dict) and data.get("type") == "sys_std":
            return data["payload"]["message_segment"]["data"]
        if isinstance(data, dict) and str(data.get("type", "")).startswith("custom_error"):
            raise AssertionError(f"error instead of a reply: {data}")


class Clients:
    """Raw Socket.IO clients speaking maim's API-Server protocol (as perf/sio_loadgen.py), one user each."""

    def __init__(self, url: str, key: str, count: int, label: str) -> None:
        self.url, self.key, self.count, self.label = url, key, count, label
        self.sockets: list = []
        self.replies: list[str] = []
        self.sent = 0

    async def __aenter__(self) -> Clients:
        headers = {"x-apikey": self.key, "x-platform": "qq"}
        self.sockets = await asyncio.gather(
            *(open_socket(f"{self.url}/?EIO=4&transport=websocket", headers) for _ in range(self.count))
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)

    async def ask(self, index: int, n: int) -> float:
        """Send one message as client `index` and wait for its reply; the seconds it took."""
        started = time.perf_counter()
        self.sent += 1
        await self.sockets[index].send(envelope(self.key, "qq", f"{self.label}-{index}", n, f"hello {n}"))
        self.replies.append(await _reply_text(self.sockets[index]))
        return time.perf_counter() - started

    async def latencies(self, messages: int, first: int = 0) -> list[float]:
        """Every client sends `messages` messages, each after the previous reply."""

        async def one(index: int) -> list[float]:
            return [await self.ask(index, first + n) for n in range(messages)]

        return [x for chunk in await asyncio.gather(*(one(i) for i in range(self.count))) for x in chunk]

    def loop(self, stop: asyncio.Event, think: float) -> list[asyncio.Task]:
        """Every client sends, waits for the reply and `think` seconds, and sends again until `stop`."""

        async def one(index: int) -> None:
            n = 0
            while not stop.is_set():
                await self.ask(index, n)
                n += 1
                await asyncio.sleep(think)

        return [asyncio.create_task(one(i)) for i in range(self.count)]


def _open_breakers(server: ReplierProcess) -> float:
    """`replier_llm_breakers_open` from the replier's /metrics."""
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    match = re.search(r"^replier_llm_breakers_open ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, "no replier_llm_breakers_open in /metrics"
    return float(match.group(1))


async def _breakers_open(server: ReplierProcess, count: int) -> None:
    await wait_for(lambda: _open_breakers(server) >= count, timeout=20)


async def _calls_settled(fake: FakeOpenAI, model: str, quiet: float = 0.5) -> int:
    """The model's call count once no new call arrived for `quiet` seconds. Calls that passed the
    breaker just before it opened (slots freed by the first failures) may still be on their way to
    the fake server when /metrics shows it open; they count as calls made before it opened."""
    count = fake.calls(model)
    while True:
        await asyncio.sleep(quiet)
        now = fake.calls(model)
        if now == count:
            return count
        count = now


async def _while_noisy(b: Clients, a: Clients, first: int) -> tuple[list[float], list[float]]:
    """B's latencies alone, then while A's clients keep sending; A's loops are stopped (cancelled)
    after. B alone is measured right before each phase, so both figures share the machine's load
    (others' test suites come and go on a shared machine)."""
    alone = await b.latencies(B_MESSAGES, first=first + 50)
    stop = asyncio.Event()
    tasks = a.loop(stop, A_THINK_SECONDS)
    await asyncio.sleep(0.3)  # A's calls fill whatever A may take
    try:
        return alone, await b.latencies(B_MESSAGES, first=first)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_noisy_neighbour_cannot_slow_another_tenant(provisioned, configured_db):
    fake = FakeOpenAI().start()
    server = ReplierProcess(
        provisioned.url,
        provisioned.app_role,
        LLM_BREAKER_FAILURES="5",
        LLM_BREAKER_COOLDOWN_SECONDS="300",  # no half-open probe during the test: every call is counted
        LLM_MEMORY_EXTRACTION="false",
        # The LLM capacity's fairness on its own: A's flood must reach the model, not the per-tenant
        # message limits (replier/limits.py, tests/replier/test_limits.py).
        **UNLIMITED_TENANTS,
    ).start()
    b_agent = make_tenant(llm=_llm(fake, "fake-sleep-0.05", timeout=10))
    hang = make_tenant(llm=_llm(fake, "fake-hang", timeout=2))
    fail = make_tenant(llm=_llm(fake, "fake-fail-a", timeout=5))
    slow = make_tenant(llm=_llm(fake, "fake-sleep-3", timeout=10))

    async def scenario() -> dict:
        out: dict = {}
        async with Clients(server.url, b_agent.secret, B_CLIENTS, "b") as b:
            await b.latencies(3, first=-10)  # warm-up (connections, caches), not timed
            async with Clients(server.url, hang.secret, A_CLIENTS, "hang") as a:
                out["hang_solo"], out["hang"] = await _while_noisy(b, a, first=100)
                await _breakers_open(server, 1)
                calls_open = await _calls_settled(fake, "fake-hang")
                # The breaker is open now: every further message of A is answered at once with the
                # fallback, without calling the model (no probe either: the cool-down is long).
                before = len(a.replies)
                await asyncio.gather(*(a.ask(i, 1000) for i in range(A_CLIENTS)))
                out["hang_after_open"] = a.replies[before:]
                out["hang_calls"] = (calls_open, fake.calls("fake-hang"))
            async with Clients(server.url, fail.secret, A_CLIENTS, "fail") as a:
                out["fail_solo"], out["fail"] = await _while_noisy(b, a, first=200)
                await _breakers_open(server, 2)
                calls_open = await _calls_settled(fake, "fake-fail-a")
                before = len(a.replies)
                await asyncio.gather(*(a.ask(i, 1000) for i in range(A_CLIENTS)))
                out["fail_after_open"] = a.replies[before:]
                out["fail_calls"] = (calls_open, fake.calls("fake-fail-a"))
                out["fail_sent"] = a.sent
            async with Clients(server.url, slow.secret, A_CLIENTS, "slow") as a:
                out["slow_solo"], out["slow"] = await _while_noisy(b, a, first=300)
        return out

    try:
        out = asyncio.run(scenario())
        usage = Scoped(hang.stream_ctx("qq", user_id="hang-0")).llm_usage.list()
    finally:
        server.stop()
        fake.stop()
    print({phase: round(p95(out[phase]), 3) for phase in out if phase.endswith(("hang", "fail", "slow", "solo"))})
    for phase in ("hang", "fail", "slow"):
        solo, noisy = p95(out[f"{phase}_solo"]), p95(out[phase])
        assert noisy <= 2 * solo, f"B's p95 with A's {phase} model: {noisy:.3f}s vs {solo:.3f}s alone"
    # Hanging model: A's breaker opened after a bounded number of calls, then no call at all.
    calls_open, calls_end = out["hang_calls"]
    assert calls_end == calls_open, "A's model was called while its breaker was open"
    assert calls_open <= A_CLIENTS, f"{calls_open} calls to A's hanging model"
    assert out["hang_after_open"] == [FALLBACK_REPLY] * A_CLIENTS
    # Failing model: the same, and far fewer calls than messages (retries included).
    calls_open, calls_end = out["fail_calls"]
    assert calls_end == calls_open
    assert calls_open < out["fail_sent"]
    assert out["fail_after_open"] == [FALLBACK_REPLY] * A_CLIENTS
    # The usage rows say which replies the open breaker gave (outcome error, error "breaker_open: ...").
    errors = [u["error"] or "" for u in usage]
    assert all(u["outcome"] == "error" for u in usage)
    assert any(e.startswith("breaker_open") for e in errors) and any(e.startswith("timeout") for e in errors)
