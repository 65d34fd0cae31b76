"""Two repliers and a two-worker configurator behind HAProxy, on PostgreSQL and Redis (conftest.py).

Clients connect only through the balancer's public addresses, as an operator's would; which replier
holds a client is read from each replier's own /health.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from maim_message import RouteConfig, Router, TargetConfig
from replier_support import MaimClient, api_message, legacy_message, run, socketio_connect, wait_for

from isolation import IsolationContext, Scoped
from isolation.operators import set_operator
from testsupport.cluster import Cluster
from testsupport.redis_server import TEST_REDIS_URL
from testsupport.servers import free_port, pid_alive

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "cluster-Password-123"


class Tenant:
    """A tenant made through the configurator behind the balancer: account, agent, API key."""

    def __init__(self, cluster: Cluster) -> None:
        self.http = httpx.Client(base_url=f"{cluster.configurator_url}/api/v1", timeout=30)
        self.username = f"c{uuid.uuid4().hex[:10]}"
        response = self.http.post(
            "/auth/register",
            json={"username": self.username, "email": f"{self.username}@example.com", "password": PASSWORD},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        self.tenant_id = body["tenant"]["id"]
        self.http.headers["Authorization"] = f"Bearer {body['tokens']['access_token']}"
        agent = self.http.post("/agents", json={"name": "cluster agent", "template_id": "friendly_assistant"})
        assert agent.status_code == 201, agent.text
        self.agent_id = agent.json()["id"]
        self.key_id, self.secret = self.new_key()

    def new_key(self) -> tuple[str, str]:
        response = self.http.post(f"/agents/{self.agent_id}/api-keys", json={"name": uuid.uuid4().hex[:8]})
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["secret"]

    def history(self, platform: str, user_id: str) -> list[dict]:
        ctx = IsolationContext(self.tenant_id, self.agent_id, platform)
        stream = Scoped(ctx).chat_streams.stream_id_for("private", user_id)
        return Scoped(ctx.child(chat_stream_id=stream)).messages.history(500)


def assert_answered_once(rows: list[dict], count: int) -> None:
    """`count` messages stored, each answered exactly once. The rows need not alternate in, out:
    a message that arrives while its stream is busy is stored (and acknowledged) at once, by
    whichever database worker commits first, so stored times do not give the arrival order; the
    order of answers is checked through what each model call saw (below)."""
    inbound = [m["message_id"] for m in rows if m["direction"] == "in"]
    answered = [m["reply_to"] for m in rows if m["direction"] == "out"]
    assert len(inbound) == count
    assert sorted(answered) == sorted(inbound)


def connections(cluster: Cluster) -> list[int]:
    """Open connections on each replier, asked directly (not through the balancer)."""
    counts = []
    for index in range(cluster.replicas):
        try:
            counts.append(httpx.get(f"{cluster.instance_http(index)}/health", timeout=2).json()["connections"])
        except httpx.HTTPError:
            counts.append(-1)  # down
    return counts


async def connect_spread(cluster: Cluster, secret: str, count: int) -> list[tuple[MaimClient, int]]:
    """`count` maim clients through the balancer, with the replier each landed on."""
    placed = []
    for _ in range(count):
        before = connections(cluster)
        client = await MaimClient(cluster.replier_url, secret).start()
        moved = await wait_for(lambda b=before: _moved(b, connections(cluster)))
        placed.append((client, moved[0]))
    return placed


def _moved(before: list[int], now: list[int]) -> tuple[int] | None:
    """(index of the one replier whose count grew,), or None (a tuple: replier 0 is a true value)."""
    grown = [i for i, (b, n) in enumerate(zip(before, now, strict=True)) if n > b]
    return (grown[0],) if len(grown) == 1 else None


def test_maim_clients_and_the_legacy_router_through_the_balancer(cluster):
    """Polling first, then the upgrade: each session stays on its replier; every reply reaches its own
    chat, and clients on different repliers never see each other's replies."""
    tenant = Tenant(cluster)
    received: list[dict] = []

    async def scenario():
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1], "the balancer put both clients on one replier"
        router = Router(RouteConfig({"wechat": TargetConfig(url=cluster.replier_url, token=tenant.secret)}))

        async def handler(message: dict):
            received.append(message)

        router.register_class_handler(handler)
        task = asyncio.create_task(router.run())
        try:
            await wait_for(lambda: router.check_connection("wechat"))
            for round_ in range(3):
                for n, (client, _) in enumerate(placed):
                    await client.send(api_message(f"round {round_} from {n}", user_id=f"user-{n}"))
                await router.send_message(legacy_message(f"legacy {round_}", platform="wechat", user_id="lu"))
            for n, (client, _) in enumerate(placed):
                texts = [(await client.reply()).message_segment.data for _ in range(3)]
                assert all(f"from {n}" in text for text in texts), texts
                assert client.replies.empty()
            await wait_for(lambda: len(received) == 3)
            assert all("legacy" in r["message_segment"]["data"] for r in received)
        finally:
            await router.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for client, _ in placed:
                await client.stop()

    run(scenario())
    for n in range(2):
        assert_answered_once(tenant.history("qq", f"user-{n}"), 3)


def test_revocation_through_the_configurator_closes_connections_on_every_replier_within_a_second(cluster):
    tenant = Tenant(cluster)

    async def scenario() -> float:
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        try:
            response = tenant.http.post(f"/api-keys/{tenant.key_id}/revoke")
            assert response.status_code == 200
            revoked = time.monotonic()
            await wait_for(lambda: connections(cluster) == [0, 0], timeout=5, interval=0.02)
            return time.monotonic() - revoked
        finally:
            for client, _ in placed:
                await client.stop()

    elapsed = run(scenario())
    # REVOCATION_CHECK_SECONDS is 600 here: only the Redis signal can do this.
    assert elapsed < 1.0, f"connections closed {elapsed:.2f} s after the revocation"


def test_one_message_id_through_both_repliers_is_stored_and_answered_once(cluster):
    tenant = Tenant(cluster)
    message_id = f"dup-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list:
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        try:
            await asyncio.gather(
                *(c.send(api_message("the same message twice", message_id=message_id)) for c, _ in placed)
            )
            first = await asyncio.wait_for(
                asyncio.wait(
                    [asyncio.ensure_future(c.reply()) for c, _ in placed], return_when=asyncio.FIRST_COMPLETED
                ),
                15,
            )
            await asyncio.sleep(2)  # time for a second (wrong) answer to show up
            done, pending = first
            for task in pending:
                task.cancel()
            replies = [t.result() for t in done]
            for client, _ in placed:
                while not client.replies.empty():
                    replies.append(client.replies.get_nowait()[0])
            return replies
        finally:
            for client, _ in placed:
                await client.stop()

    replies = run(scenario())
    rows = tenant.history("qq", "user-1")
    assert [(m["direction"], m["message_id"]) for m in rows] == [("in", message_id), ("out", f"mt-reply:{message_id}")]
    assert replies and {r.message_info.message_id for r in replies} == {f"mt-reply:{message_id}"}
    assert len({r.message_segment.data for r in replies}) == 1  # a replay is the stored answer, not a new one


def test_login_limit_is_shared_by_the_configurator_workers(cluster):
    limit = int(cluster.env["LOGIN_RATE_LIMIT"])
    tenant = Tenant(cluster)
    assert (cluster.run_dir / "configurator.log").read_text().count("Started server process") == 2
    http = httpx.Client(base_url=cluster.configurator_url, timeout=30)
    statuses = [
        http.post("/api/v1/auth/login", json={"username": tenant.username, "password": "wrong-password-1"}).status_code
        for _ in range(limit * 3)
    ]
    assert statuses == [401] * limit + [429] * (limit * 2)


def _fresh_window(window: float, room: float = 10.0) -> None:
    """Wait for the next window (aligned to the epoch) when less than `room` seconds are left of this one,
    so what a test counts falls in one window."""
    left = window - time.time() % window
    if left < room:
        time.sleep(left + 0.05)


def test_a_tenant_message_limit_is_enforced_once_across_both_repliers(cluster):
    """messages_per_minute 3, counted in Redis: 3 messages pass in total, alternating between the two
    repliers, and the 4th is refused `rate_limited` on whichever replier it reaches."""
    tenant = Tenant(cluster)
    Scoped(IsolationContext(tenant.tenant_id)).tenant.set_limits(
        {"messages_per_minute": 3, "agent_messages_per_minute": 0}
    )

    async def scenario() -> list[tuple[str, object]]:
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        try:
            _fresh_window(float(cluster.env["LIMIT_WINDOW_SECONDS"]))
            answers = []
            for i in range(5):
                client = placed[i % 2][0]
                await client.send(api_message(f"m{i}", message_id=f"lim-{i}", user_id=f"u{i % 2}"))
                answers.append(await client.reply_or_error(timeout=15.0))
            return answers
        finally:
            for client, _ in placed:
                await client.stop()

    answers = run(scenario())
    assert [kind for kind, _ in answers] == ["reply"] * 3 + ["error"] * 2
    for _, error in answers[3:]:
        assert error["code"] == "rate_limited" and error["limit"] == "messages_per_minute"
    stored = {m["message_id"] for n in range(2) for m in tenant.history("qq", f"u{n}") if m["direction"] == "in"}
    assert stored == {"lim-0", "lim-1", "lim-2"}  # nothing of the refused ones


def test_a_tenant_connection_limit_is_enforced_once_across_both_repliers(cluster):
    """connections 2, counted in Redis: one client on each replier, and a third is refused on either."""
    tenant = Tenant(cluster)
    Scoped(IsolationContext(tenant.tenant_id)).tenant.set_limits({"connections": 2})

    async def scenario() -> list[dict | None]:
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        headers = {"x-apikey": tenant.secret, "x-platform": "qq"}
        try:
            refusals = [await socketio_connect(cluster.replier_url, headers) for _ in range(4)]
            await placed[0][0].stop()
            await wait_for(lambda: sum(connections(cluster)) == 1)
            refusals.append(await socketio_connect(cluster.replier_url, headers))  # a place is free again
            return refusals
        finally:
            for client, _ in placed:
                await client.stop()

    refusals = run(scenario())
    assert all("limit of 2 open connections" in r["message"] for r in refusals[:4]), refusals
    assert refusals[4] is None


def test_a_tenant_request_limit_is_shared_by_the_configurator_workers(cluster):
    """requests_per_minute 5, counted in Redis: 5 requests pass in total, each on a new connection
    (so the kernel hands them to either worker), then 429 with Retry-After."""
    username = f"r{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{cluster.configurator_url}/api/v1/auth/register",
        json={"username": username, "email": f"{username}@example.com", "password": PASSWORD},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    Scoped(IsolationContext(body["tenant"]["id"])).tenant.set_limits({"requests_per_minute": 5})
    headers = {"Authorization": f"Bearer {body['tokens']['access_token']}"}
    _fresh_window(float(cluster.env["LIMIT_WINDOW_SECONDS"]))
    answers = [httpx.get(f"{cluster.configurator_url}/api/v1/agents", headers=headers, timeout=30) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    assert answers[-1].json()["error"]["details"]["limit"] == "requests_per_minute"
    assert int(answers[-1].headers["retry-after"]) >= 1


def test_suspension_by_the_operator_closes_the_tenant_on_every_replier_within_a_second(cluster, provisioned):
    """LIMITS_REFRESH_SECONDS is 60 here: only the Redis signal can close them in time. Resuming lets
    the tenant back at once."""
    operator = Tenant(cluster)
    set_operator(provisioned.admin_url, operator.username)
    tenant = Tenant(cluster)
    ops = f"/operator/tenants/{tenant.tenant_id}"

    async def scenario() -> tuple[float, float]:
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        try:
            response = operator.http.post(f"{ops}/suspend")
            assert response.status_code == 200, response.text
            suspended = time.monotonic()
            await wait_for(lambda: connections(cluster) == [0, 0], timeout=5, interval=0.02)
            elapsed = time.monotonic() - suspended
        finally:
            for client, _ in placed:
                await client.stop()
        headers = {"x-apikey": tenant.secret, "x-platform": "qq"}
        assert "suspended" in (await socketio_connect(cluster.replier_url, headers))["message"]
        assert operator.http.post(f"{ops}/resume").status_code == 200
        resumed = time.monotonic()
        while await socketio_connect(cluster.replier_url, headers) is not None:  # the signal is on its way
            assert time.monotonic() - resumed < 1.0, "still refused a second after the resumption"
            await asyncio.sleep(0.02)
        return elapsed, time.monotonic() - resumed

    elapsed, back = run(scenario())
    assert elapsed < 1.0, f"connections closed {elapsed:.2f} s after the suspension"
    assert back < 1.0


def _invoke(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_invoke_start_cluster_status_and_stop_servers(provisioned, tmp_path):
    """The operator's one command, detached: every process healthy in `status`, all gone after
    `stop-servers`. (Its own deployment: a channel prefix and ports of its own.)"""
    run_dir = tmp_path / "run"
    ports = [str(free_port()), str(free_port())]
    env = {"DATABASE_APP_ROLE": provisioned.app_role, "REDIS_PREFIX": f"mt-invoke-{uuid.uuid4().hex[:8]}"}
    started = _invoke(
        "start-cluster", "--replicas", "2", "--workers", "1", "--detach", "--no-upgrade", "--run-dir", str(run_dir),
        "--database-url", provisioned.url, "--redis-url", TEST_REDIS_URL,
        "--configurator-port", ports[0], "--replier-port", ports[1],
        env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"ws://127.0.0.1:{ports[1]}/ws" in started.stdout and "r1, r2" in started.stdout
    state = json.loads((run_dir / "servers.json").read_text())
    assert list(state) == ["balancer", "configurator", "replier-r1", "replier-r2"]
    assert "use-server r2 if { url_param(sid) -m beg r2. }" in (run_dir / "haproxy.cfg").read_text()
    try:
        status = _invoke("status", "--run-dir", str(run_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" up ") == 4
    finally:
        stopped = _invoke("stop-servers", "--run-dir", str(run_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not any(pid_alive(int(info["pid"])) for info in state.values())
    assert _invoke("status", "--run-dir", str(run_dir)).returncode == 1


def test_invoke_start_cluster_says_what_to_install(tmp_path):
    """No haproxy on PATH: a one-line error with the install command, nothing started."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    result = _invoke("start-cluster", "--run-dir", str(tmp_path / "run"), env={"PATH": str(bare)})
    assert result.returncode == 1
    assert "haproxy is not installed: apt-get install -y haproxy" in result.stderr
    no_redis = _invoke("start-cluster", "--run-dir", str(tmp_path / "run"), "--redis-url", "redis://127.0.0.1:1/0")
    assert no_redis.returncode == 1 and "apt-get install -y redis-server" in no_redis.stderr


def test_one_stream_through_two_repliers_is_answered_in_order(cluster, fake_llm):
    """Two adapters of one agent on different repliers speak in one group at once; the model takes
    0.3 s per answer. Each message is answered after the one before it (replies in message order),
    and each answer saw the exchange before it, whichever replier stored it."""
    tenant = Tenant(cluster)
    llm = {"provider": "openai", "base_url": fake_llm.base_url, "model": "fake-sleep-0.3", "api_key": "sk-fake-key"}
    response = tenant.http.patch(f"/agents/{tenant.agent_id}", json={"llm": llm})
    assert response.status_code == 200, response.text

    async def scenario():
        placed = await connect_spread(cluster, tenant.secret, 2)
        assert sorted(where for _, where in placed) == [0, 1]
        try:
            for round_ in range(3):
                for n, (client, _) in enumerate(placed):
                    await client.send(api_message(f"r{round_} c{n}", user_id="u", group_id="order-group"))
                    await asyncio.sleep(0.05)
            for client, _ in placed:
                for _ in range(3):
                    await client.reply(timeout=30)
            # Then strictly taking turns: each replier takes the stream over from the other.
            for round_ in range(3, 5):
                for n, (client, _) in enumerate(placed):
                    await client.send(api_message(f"r{round_} c{n}", user_id="u", group_id="order-group"))
                    await client.reply(timeout=30)
        finally:
            for client, _ in placed:
                await client.stop()

    run(scenario())
    ctx = IsolationContext(tenant.tenant_id, tenant.agent_id, "qq")
    stream = Scoped(ctx).chat_streams.stream_id_for("group", "order-group")
    rows = Scoped(ctx.child(chat_stream_id=stream)).messages.history(100)
    assert_answered_once(rows, 10)
    # Each answer's model call had the exchange stored just before it (by either replier) in its
    # context: a replier taking a stream over from the other reads its history again.
    texts = [re.search(r"r\d c\d", str(m)).group(0) for m in rows if m["direction"] == "in"]
    calls = [str(r["messages"]) for r in fake_llm.requests if r.get("model") == "fake-sleep-0.3"]
    assert len(calls) == 10
    # The model was asked in the order the messages were stored (arrival order, across repliers) ...
    asked = [re.findall(r"r\d c\d", call)[-1] for call in calls]
    assert asked == texts, (asked, texts)
    # ... and each call saw the exchange before it.
    for before, call in zip(texts, calls[1:], strict=False):
        assert before in call, (before, call)


def test_kill_9_of_a_replier_under_traffic(cluster):
    """Runs last (it takes a replier away). Its clients are back through the balancer on the other
    replier within 10 s; every message that was answered is stored, and traffic goes on."""
    tenant = Tenant(cluster)
    replied: dict[str, str] = {}
    sent: list[str] = []

    async def scenario() -> float:
        placed = await connect_spread(cluster, tenant.secret, 4)
        victims = [c for c, where in placed if where == 0]
        assert victims and len(victims) < 4
        stop = asyncio.Event()

        async def talk(n: int, client: MaimClient):
            while not stop.is_set():
                mid = f"k{n}-{uuid.uuid4().hex[:8]}"
                if await client.client.send_message(api_message(f"traffic {mid}", message_id=mid, user_id=f"u{n}")):
                    sent.append(mid)
                await asyncio.sleep(0.1)

        async def collect(client: MaimClient):
            while True:
                message = await client.reply(timeout=3600)
                replied[message.message_info.message_id.removeprefix("mt-reply:")] = message.message_segment.data

        talkers = [asyncio.create_task(talk(n, c)) for n, (c, _) in enumerate(placed)]
        collectors = [asyncio.create_task(collect(c)) for c, _ in placed]
        try:
            await asyncio.sleep(1.5)
            cluster.repliers[0].process.kill()  # SIGKILL: no drain, no goodbye
            killed = time.monotonic()
            await wait_for(
                lambda: all(c.client.is_connected() for c, _ in placed) and connections(cluster)[1] == 4,
                timeout=20,
                interval=0.05,
            )
            back = time.monotonic() - killed
            before = len(replied)
            await wait_for(lambda: len(replied) >= before + 8, timeout=15)
            return back
        finally:
            stop.set()
            await asyncio.gather(*talkers, return_exceptions=True)
            await asyncio.sleep(1)
            for task in collectors:
                task.cancel()
            await asyncio.gather(*collectors, return_exceptions=True)
            for client, _ in placed:
                await client.stop()

    back = run(scenario())
    assert back < 10.0, f"clients of the killed replier back after {back:.1f} s"
    stored = set()
    for n in range(4):
        stored |= {m["message_id"] for m in tenant.history("qq", f"u{n}") if m["direction"] == "in"}
    assert set(replied) <= stored, "a message answered before or after the kill is missing from the database"
    assert len(replied) > 10
