"""End to end: both backends as subprocesses, driven over HTTP and maim_message like a customer would.

* the CLI's N x M x K flow answers every message and its report adds up;
* stored history and `/tenant/stats` match what was exchanged;
* another tenant's token or API key cannot reach a tenant's agents, keys, streams or replies;
* a bystander tenant is untouched by runs and cleanups, and cleanup leaves nothing of a run, even
  with a reply in flight or a client still connected when the tenant is deleted.

No timing assertions: latencies are reported, not judged.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
from rich.console import Console

from integration_tests.api import Account, ConfiguratorClient
from integration_tests.chat import ChatConnection, ChatError, close_all
from integration_tests.cli import main
from integration_tests.runner import new_run_prefix
from testsupport.databases import table_counts, tenant_row_counts
from testsupport.servers import ThreadedServer, free_port

PASSWORD = "integration-password-1"
USERS, AGENTS, MESSAGES = 3, 2, 5


def in_thread(function, *args, **kwargs):
    """Call `function` in a worker thread and return its result.

    Event loops run off the test's own thread: on Python 3.11 a cancelled task makes coverage lose
    the rest of every frame on the loop's thread (CPython issue 106749), which would hide the test's
    assertions from the coverage report.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args, **kwargs).result()


def run(coro):
    return in_thread(asyncio.run, coro)


def run_cli(args: list[str]) -> tuple[int, str]:
    """`python -m integration_tests ARGS` in this process; returns the exit code and what it printed."""
    out = io.StringIO()
    code = in_thread(main, args, console=Console(file=out, width=160, color_system=None))
    return code, out.getvalue()


async def _login_statuses(servers, usernames: list[str], password: str = PASSWORD) -> list[int]:
    async with ConfiguratorClient(servers.configurator_url) as api:
        return [await api.login_status(name, password) for name in usernames]


async def _chat(servers, api_key: str, texts: list[str], *, platform="qq", group_id=None, user_id="someone", **kw):
    """Open one connection, ask each text in turn, close; returns the replies."""
    connection = ChatConnection(servers.replier_url, api_key, platform, user_id, "Tester", group_id)
    await connection.open()
    try:
        replies = []
        for text in texts:
            reply, _ = await connection.ask(text, kw.get("id_prefix", "") + secrets.token_hex(6), 20)
            replies.append(reply)
        return replies
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def bystander(servers):
    """A tenant that exists before any run: agents, keys, chat history and memories."""

    async def make() -> dict:
        async with ConfiguratorClient(servers.configurator_url) as api:
            name = f"bystander_{secrets.token_hex(4)}"
            account = await api.register(name, f"{name}@example.com", PASSWORD)
            keys = []
            for i, template in enumerate(("caring_friend", "professional_expert")):
                agent = await api.create_agent(account, f"bystander agent {i}", template)
                key = await api.create_api_key(account, agent["id"])
                keys.append(key)
                await api.add_memory(account, agent["id"], f"bystander memory {i}")
            await _chat(servers, keys[0]["secret"], ["Hi, my name is Bea.", "How are you?"], group_id="shared-group")
            await _chat(servers, keys[1]["secret"], ["Remember that I like tea."], platform="wechat", user_id="bea")
            return {"account": account, "keys": keys}

    made = run(make())
    made["counts"] = tenant_row_counts(servers.database, made["account"].tenant_id)
    assert made["counts"]["messages"] == 6 and made["counts"]["memories"] >= 2
    return made


def assert_bystander_untouched(servers, bystander) -> None:
    assert tenant_row_counts(servers.database, bystander["account"].tenant_id) == bystander["counts"]


# -- the N x M x K flow, with cleanup ------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(servers, bystander, tmp_path_factory):
    report_path = tmp_path_factory.mktemp("report") / "report.json"
    before = table_counts(servers.database)
    args = ["--users", str(USERS), "--agents", str(AGENTS), "--messages", str(MESSAGES), "--concurrency", "4"]
    code, output = run_cli([*args, "--timeout", "20", "--report", str(report_path), *servers.cli_args()])
    after = table_counts(servers.database)
    report = json.loads(report_path.read_text())
    return {"code": code, "output": output, "report": report, "before": before, "after": after}


def test_every_message_is_answered_and_the_report_adds_up(full_run):
    report = full_run["report"]
    assert full_run["code"] == 0, full_run["output"]
    assert report["ok"] is True and report["errors"] == []
    conversations = USERS * AGENTS
    totals = report["totals"]
    assert totals == {
        **totals,
        "conversations": conversations,
        "conversations_ok": conversations,
        "messages_sent": conversations * MESSAGES,
        "replies_received": conversations * MESSAGES,
        "offline_replies": conversations * MESSAGES,  # no LLM configured: the labelled offline responder
        "success_rate": 1.0,
        "conversation_success_rate": 1.0,
    }
    assert report["parameters"]["users"] == USERS and report["parameters"]["messages"] == MESSAGES
    prefix = report["run_prefix"]
    assert prefix.startswith("it_") and prefix.endswith("_")
    created = report["created"]
    assert len(created["accounts"]) == USERS and len(created["agents"]) == conversations
    assert len(created["api_keys"]) == conversations
    assert all(a["username"].startswith(prefix) for a in created["accounts"])
    # every user's agents come from different templates
    for account in created["accounts"]:
        templates = [a["template_id"] for a in created["agents"] if a["username"] == account["username"]]
        assert len(set(templates)) == AGENTS
    latencies = []
    for conv in report["conversations"]:
        assert conv["ok"] and conv["errors"] == []
        assert conv["sent"] == conv["received"] == MESSAGES
        assert len(conv["latencies_ms"]) == MESSAGES and all(x > 0 for x in conv["latencies_ms"])
        assert conv["history"] == {"ok": True, "count": 2 * MESSAGES, "problems": []}
        latencies += conv["latencies_ms"]
    # one chat stream per conversation, each on its own platform/group/user
    assert len({c["chat_stream_id"] for c in report["conversations"]}) == conversations
    assert len({(c["platform"], c["group_id"], c["user_id"]) for c in report["conversations"]}) == conversations
    assert {c["kind"] for c in report["conversations"]} == {"group", "private"}
    lat = report["latency_ms"]
    assert lat["count"] == len(latencies) == conversations * MESSAGES
    assert lat["min"] == min(latencies) and lat["max"] == max(latencies)
    assert lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert all(s["ok"] and s["stats"]["agents"] == AGENTS for s in report["tenant_stats"])
    # the printed summary says the same
    assert "PASSED" in full_run["output"] and prefix in full_run["output"]
    assert f"{conversations * MESSAGES} / {conversations * MESSAGES}" in full_run["output"]


def test_cleanup_removes_exactly_the_run(full_run, servers, bystander):
    report = full_run["report"]
    cleanup = report["cleanup"]
    conversations = USERS * AGENTS
    assert cleanup["mode"] == "http+database" and cleanup["complete"] is True and cleanup["failures"] == []
    assert cleanup["deleted"] == {
        **cleanup["deleted"],
        "tenants": USERS,
        "accounts": USERS,
        "memberships": USERS,
        "agents": conversations,
        "api_keys": conversations,
        "chat_streams": conversations,
        "messages": 2 * conversations * MESSAGES,
        "llm_usage": conversations * MESSAGES,
    }
    assert cleanup["accounts_left"] == 0 and cleanup["login_status_after"] == {"401": USERS}
    # every table holds exactly what it held before the run: nothing left, nobody else touched
    assert full_run["after"] == full_run["before"]
    for account in report["created"]["accounts"]:
        assert set(tenant_row_counts(servers.database, account["tenant_id"]).values()) == {0}
    assert_bystander_untouched(servers, bystander)
    usernames = [a["username"] for a in report["created"]["accounts"]]
    assert run(_login_statuses(servers, usernames)) == [401] * USERS


def test_the_report_holds_no_secrets(full_run, kept_run):
    for report in (full_run["report"], kept_run):
        text = json.dumps(report)
        assert "mtk_" not in text and PASSWORD not in text and "access_token" not in text


def test_unanswered_messages_fail_the_run_and_cleanup_still_runs(servers, bystander, tmp_path):
    """A reply deadline nobody can meet: every conversation fails, exit status 1, nothing left behind."""
    report_path = tmp_path / "report.json"
    before = table_counts(servers.database)
    args = ["--users", "1", "--agents", "2", "--messages", "2", "--timeout", "0.000001"]
    code, output = run_cli([*args, "--report", str(report_path), *servers.cli_args()])
    report = json.loads(report_path.read_text())
    assert code == 1 and report["ok"] is False and "FAILED" in output
    assert report["totals"]["conversations_ok"] == 0 and report["totals"]["replies_received"] == 0
    for conv in report["conversations"]:
        assert conv["ok"] is False and any("no reply" in e for e in conv["errors"])
        assert conv["sent"] == 1  # a conversation stops at its first unanswered message
    assert report["latency_ms"]["count"] == 0 and report["latency_ms"]["p50"] is None
    assert report["cleanup"]["complete"] is True
    assert table_counts(servers.database) == before
    assert_bystander_untouched(servers, bystander)


def test_an_unreachable_replier_fails_fast_and_creates_nothing(servers, tmp_path):
    report_path = tmp_path / "report.json"
    before = table_counts(servers.database)
    args = [*servers.cli_args(), "--replier-url", f"ws://127.0.0.1:{free_port()}/ws", "--report", str(report_path)]
    code, _ = run_cli(args)
    report = json.loads(report_path.read_text())
    assert code == 1 and report["ok"] is False
    assert report["created"]["accounts"] == [] and any("ConnectError" in e for e in report["errors"])
    assert table_counts(servers.database) == before


# -- a run without cleanup: inspect what it stored, then remove it by prefix -----------------------
@pytest.fixture(scope="module")
def kept_run(servers, bystander, tmp_path_factory):
    report_path = tmp_path_factory.mktemp("kept") / "report.json"
    args = ["--users", "2", "--agents", "2", "--messages", "3", "--no-cleanup", "--transcripts"]
    code, output = run_cli([*args, "--password", PASSWORD, "--report", str(report_path), *servers.cli_args()])
    assert code == 0, output
    return json.loads(report_path.read_text())


def test_history_and_stats_match_what_was_exchanged(kept_run, servers):
    assert kept_run["cleanup"] == {"mode": "skipped"}
    by_user: dict[str, list[dict]] = {}
    for conv in kept_run["conversations"]:
        by_user.setdefault(conv["username"], []).append(conv)

    async def inspect() -> None:
        async with ConfiguratorClient(servers.configurator_url) as api:
            for username, convs in by_user.items():
                account = Account(username, "", PASSWORD, "", "", "", "")
                await api.login(account)
                stats = await api.stats(account)
                memories = 0
                for conv in convs:
                    streams = await api.chat_streams(account, conv["agent_id"])
                    assert [s["id"] for s in streams] == [conv["chat_stream_id"]]
                    assert streams[0]["platform"] == conv["platform"] and streams[0]["kind"] == conv["kind"]
                    rows = await api.messages(account, conv["chat_stream_id"])
                    assert [(r["direction"], r["text"]) for r in rows] == [
                        ("in" if t["role"] == "user" else "out", t["text"]) for t in conv["transcript"]
                    ]
                    assert len(rows) == 6
                    for question, answer in zip(rows[::2], rows[1::2], strict=True):
                        assert answer["reply_to"] == question["message_id"]
                        assert question["sender_user_id"] == conv["user_id"]
                    memories += len(await api.memories(account, conv["agent_id"]))
                assert stats == {
                    **stats,
                    "agents": 2,
                    "api_keys": 2,
                    "active_api_keys": 2,
                    "members": 1,
                    "chat_streams": 2,
                    "messages": 12,
                    "llm_calls": 6,
                    "llm_errors": 0,
                    "memories": memories,
                }

    run(inspect())


def test_cleanup_prefix_removes_leftovers_of_a_no_cleanup_run(kept_run, servers, bystander):
    prefix = kept_run["run_prefix"]
    tenants = [a["tenant_id"] for a in kept_run["created"]["accounts"]]
    assert all(tenant_row_counts(servers.database, t)["messages"] == 12 for t in tenants)
    args = ["--database-url", servers.database.url]
    if servers.database.app_role:
        args += ["--database-app-role", servers.database.app_role]
    code, output = run_cli(["--cleanup-prefix", prefix, *args])
    assert code == 0, output
    assert "messages" in output and "24" in output and "accounts" in output
    for tenant_id in tenants:
        assert set(tenant_row_counts(servers.database, tenant_id).values()) == {0}
    usernames = [a["username"] for a in kept_run["created"]["accounts"]]
    assert run(_login_statuses(servers, usernames)) == [401, 401]
    assert_bystander_untouched(servers, bystander)
    # nothing left to remove: a second pass deletes nothing and still succeeds
    code, output = run_cli(["--cleanup-prefix", prefix, *args])
    assert code == 0 and "total" in output


def test_cleanup_prefix_needs_a_database_and_a_safe_prefix(servers, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code, output = run_cli(["--cleanup-prefix", new_run_prefix()])
    assert code == 2 and "--database-url" in output
    for prefix in ("bystander", "it_", ""):
        code, output = run_cli(["--cleanup-prefix", prefix, "--database-url", servers.database.url])
        assert code == 2 and ("--force" in output or "empty cleanup prefix" in output), output


def test_cleanup_prefix_never_deletes_a_customers_tenant_named_like_the_run(servers, bystander):
    """Tenant names are the customer's: only the run's accounts (and tenants only they belong to) go."""
    prefix = new_run_prefix()
    customer = f"carol_{secrets.token_hex(4)}"

    async def make() -> tuple[dict, Account]:
        async with ConfiguratorClient(servers.configurator_url) as api:
            body = {"username": customer, "email": f"{customer}@example.com", "password": PASSWORD}
            registered = await api.request(
                "POST", "/auth/register", json={**body, "tenant_name": f"{prefix}my real company"}, expect=201
            )
            run_account = await api.register(f"{prefix}u0", f"{prefix}u0@example.com", PASSWORD)
            return registered, run_account

    registered, run_account = run(make())
    customer_tenant = registered["tenant"]["id"]
    before = tenant_row_counts(servers.database, customer_tenant)
    args = ["--cleanup-prefix", prefix, "--database-url", servers.database.url]
    if servers.database.app_role:
        args += ["--database-app-role", servers.database.app_role]
    code, output = run_cli(args)
    assert code == 0, output
    assert tenant_row_counts(servers.database, customer_tenant) == before and before["memberships"] == 1
    assert run(_login_statuses(servers, [customer, run_account.username])) == [200, 401]
    assert set(tenant_row_counts(servers.database, run_account.tenant_id).values()) == {0}
    assert_bystander_untouched(servers, bystander)

    async def remove_customer() -> None:
        async with ConfiguratorClient(servers.configurator_url) as api:
            account = Account(customer, f"{customer}@example.com", PASSWORD, "", customer_tenant, "", "")
            await api.login(account)
            await api.delete_account(account)

    run(remove_customer())


# -- cross-tenant probes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_tenants(servers):
    """Tenants A and B (run-prefixed), each with an agent, a key and one chat; removed afterwards."""
    prefix = new_run_prefix()

    async def make() -> dict:
        async with ConfiguratorClient(servers.configurator_url) as api:
            made = {}
            for name in ("a", "b"):
                username = f"{prefix}{name}"
                account = await api.register(username, f"{username}@example.com", PASSWORD)
                agent = await api.create_agent(account, f"agent {name}", "friendly_assistant")
                key = await api.create_api_key(account, agent["id"])
                memory = await api.add_memory(account, agent["id"], f"secret memory of {name}")
                made[name] = {"account": account, "agent": agent, "key": key, "memory": memory}
            replies = await _chat(servers, made["a"]["key"]["secret"], ["Hello from A"], group_id="g-42", user_id="u-1")
            made["a"]["stream_id"] = replies[0].chat_stream_id
            return made

    made = run(make())
    yield made

    async def remove() -> None:
        async with ConfiguratorClient(servers.configurator_url) as api:
            for entry in made.values():
                await api.delete_tenant(entry["account"])

    run(remove())
    args = ["--cleanup-prefix", prefix, "--database-url", servers.database.url]
    if servers.database.app_role:
        args += ["--database-app-role", servers.database.app_role]
    code, output = run_cli(args)  # the accounts (DELETE /tenant keeps them)
    assert code == 0, output


def test_another_tenants_token_gets_404_for_every_id(two_tenants, servers):
    a, b = two_tenants["a"], two_tenants["b"]
    agent_id, key_id, stream_id = a["agent"]["id"], a["key"]["id"], a["stream_id"]
    memory_id = a["memory"]["id"]
    probes = [
        ("GET", f"/agents/{agent_id}", None),
        ("PATCH", f"/agents/{agent_id}", {"name": "taken over"}),
        ("GET", f"/agents/{agent_id}/api-keys", None),
        ("POST", f"/agents/{agent_id}/api-keys", {"name": "stolen"}),
        ("POST", f"/api-keys/{key_id}/revoke", None),
        ("GET", f"/agents/{agent_id}/chat-streams", None),
        ("GET", f"/chat-streams/{stream_id}/messages", None),
        ("GET", f"/agents/{agent_id}/memories", None),
        ("POST", f"/agents/{agent_id}/memories", {"content": "planted"}),
        ("DELETE", f"/agents/{agent_id}/memories/{memory_id}", None),
        ("DELETE", f"/agents/{agent_id}/memories", None),
        ("DELETE", f"/agents/{agent_id}/history", None),
        ("DELETE", f"/api-keys/{key_id}", None),
        ("DELETE", f"/agents/{agent_id}", None),
    ]

    async def probe() -> tuple[dict, dict, list, list]:
        async with ConfiguratorClient(servers.configurator_url) as api:
            before = await api.stats(a["account"])
            for method, path, body in probes:
                kwargs = {"json": body} if body is not None else {}
                data = await api.request(method, path, account=b["account"], expect=404, **kwargs)
                assert data["error"]["code"] == "not_found", (method, path, data)
            after = await api.stats(a["account"])
            keys = (await api.request("GET", f"/agents/{agent_id}/api-keys", account=a["account"]))["items"]
            messages = await api.messages(a["account"], stream_id)
            return before, after, keys, messages

    before, after, keys, messages = run(probe())
    assert after == before and before["messages"] == 2 and before["memories"] >= 1
    assert [(k["id"], k["status"]) for k in keys] == [(key_id, "active")]
    assert messages[0]["text"] == "Hello from A"
    # A's key still works after all of B's attempts
    replies = run(_chat(servers, a["key"]["secret"], ["Still mine?"], group_id="g-42", user_id="u-1"))
    assert replies[0].chat_stream_id == stream_id


def test_another_tenants_key_cannot_reach_a_stream_over_socketio(two_tenants, servers):
    """B writes A's key into message_dim, reuses A's platform, group, user and even message ids."""
    a, b = two_tenants["a"], two_tenants["b"]
    a_key, b_key = a["key"]["secret"], b["key"]["secret"]

    async def attack() -> dict:
        async with ConfiguratorClient(servers.configurator_url) as api:
            a_before = await api.messages(a["account"], a["stream_id"])
            victim = ChatConnection(servers.replier_url, a_key, "qq", "u-1", "A", "g-42")
            intruder = ChatConnection(servers.replier_url, b_key, "qq", "u-1", "A", "g-42")
            await victim.open()
            await intruder.open()
            try:
                replies = []
                # a fresh id, and A's own stored message id (a replay inside A's stream would answer it)
                for message_id in (f"b-{secrets.token_hex(4)}", a_before[0]["message_id"]):
                    reply, _ = await intruder.ask("B speaking: show me A's chat", message_id, 20, dim_api_key=a_key)
                    replies.append(reply)
                # A's connection is in the same platform/group; a leak would arrive there. Ask A once so
                # anything the replier sent before that reply has certainly arrived.
                own, _ = await victim.ask("A again", f"a-{secrets.token_hex(4)}", 20)
                victim_stray = await victim.drain()
            finally:
                await close_all([victim, intruder])
            a_after = await api.messages(a["account"], a["stream_id"])
            b_streams = await api.chat_streams(b["account"], b["agent"]["id"])
            b_messages = await api.messages(b["account"], b_streams[0]["id"]) if b_streams else []
            return {
                "replies": replies,
                "own": own,
                "victim_stray": victim_stray,
                "intruder_stray": intruder.stray,
                "a_before": a_before,
                "a_after": a_after,
                "b_streams": b_streams,
                "b_messages": b_messages,
            }

    r = run(attack())
    stream_a = a["stream_id"]
    # B's replies come from B's own stream, and B's texts are answered (not A's history replayed)
    assert all(reply.chat_stream_id not in (None, stream_a) for reply in r["replies"])
    assert all("B speaking" in reply.text for reply in r["replies"])
    assert r["victim_stray"] == [] and r["intruder_stray"] == []
    assert r["own"].chat_stream_id == stream_a
    # A's history only grew by A's own exchange; B's history holds exactly B's messages
    added = r["a_after"][len(r["a_before"]) :]
    assert r["a_after"][: len(r["a_before"])] == r["a_before"]
    assert [(m["direction"], m["text"]) for m in added[:1]] == [("in", "A again")] and len(added) == 2
    assert [s["group_id"] for s in r["b_streams"]] == ["g-42"]
    assert r["b_streams"][0]["id"] != stream_a
    assert [m["text"] for m in r["b_messages"] if m["direction"] == "in"] == ["B speaking: show me A's chat"] * 2
    assert all("Hello from A" not in m["text"] for m in r["b_messages"])


# -- the conversation generator with an OpenAI-compatible LLM ---------------------------------------
class FakeModel:
    """TEST DOUBLE: an OpenAI-compatible `/v1/chat/completions` on a free port.

    Answers `content` after `delay` seconds; with `fail_after=n`, requests after the n-th get HTTP 500.
    """

    def __init__(self, content: str, *, delay: float = 0.0, fail_after: int | None = None) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.content = content
        self.delay = delay
        self.fail_after = fail_after
        self.requests: list[dict] = []
        app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])
        self.server = ThreadedServer(app, name="fake-model")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    async def completions(self, request):
        from starlette.responses import JSONResponse

        body = await request.json()
        self.requests.append(body)
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            return JSONResponse({"error": {"message": "fake outage"}}, status_code=500)
        await asyncio.sleep(self.delay)
        return JSONResponse(
            {
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.content}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9},
            }
        )

    def __enter__(self) -> FakeModel:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(10)


def test_user_messages_come_from_a_configured_llm(servers, monkeypatch, tmp_path):
    report_path = tmp_path / "report.json"
    with FakeModel("Hello agent, I am a simulated user who loves tea.", fail_after=1) as fake:
        monkeypatch.setenv("LLM_PROVIDER", "openai")
        monkeypatch.setenv("LLM_BASE_URL", fake.base_url)
        monkeypatch.setenv("LLM_MODEL", "sim-user")
        monkeypatch.setenv("LLM_API_KEY", "sk-test")
        args = ["--users", "1", "--agents", "1", "--messages", "2", "--transcripts", "--report", str(report_path)]
        code, output = run_cli([*servers.cli_args(), "--llm", *args])
    report = json.loads(report_path.read_text())
    assert code == 0, output
    assert report["parameters"]["generator"].startswith("llm (openai-compatible sim-user")
    # the first message is the model's; the model then fails and the run falls back to the topic list
    assert report["totals"]["generator_llm_messages"] == 1 and report["totals"]["generator_llm_failures"] == 1
    transcript = report["conversations"][0]["transcript"]
    assert transcript[0] == {"role": "user", "text": "Hello agent, I am a simulated user who loves tea."}
    assert len(transcript) == 4 and transcript[2]["text"] != transcript[0]["text"]
    first, second = fake.requests[0], fake.requests[1]
    assert first["model"] == "sim-user" and "You play a human user" in first["messages"][0]["content"]
    # the second request carries the conversation so far: the simulated user's turn and the agent's reply
    assert [m["content"] for m in second["messages"][1:3]] == [transcript[0]["text"], transcript[1]["text"]]
    assert "mtk_" not in json.dumps(report) and "sk-test" not in json.dumps(report)


def test_a_reply_in_flight_when_its_tenant_is_deleted_leaves_nothing(servers, bystander):
    """The agent's (slow) model is still answering when the owner deletes the tenant."""
    with FakeModel("a slow answer", delay=2.0) as model:

        async def race() -> tuple[Account, dict, dict]:
            async with ConfiguratorClient(servers.configurator_url) as api:
                name = f"{new_run_prefix()}slow"
                account = await api.register(name, f"{name}@example.com", PASSWORD)
                llm = {"provider": "openai", "base_url": model.base_url, "model": "slow", "api_key": "sk-fake"}
                agent = await api.create_agent(account, "slow agent", None, llm=llm)
                key = await api.create_api_key(account, agent["id"])
                connection = ChatConnection(servers.replier_url, key["secret"], "qq", "u-1", "U", "g-1")
                await connection.open()
                try:
                    await connection.send(connection.message("hello, slow agent", "m-1"))
                    for _ in range(200):  # until the replier has asked the model
                        if model.requests:
                            break
                        await asyncio.sleep(0.05)
                    during = tenant_row_counts(servers.database, account.tenant_id)
                    deleted = await api.delete_tenant(account)
                    await asyncio.sleep(model.delay + 1.5)  # the model answers; the replier tries to store it
                finally:
                    await connection.close()
                return account, during, deleted

        account, during, deleted = run(race())
    assert model.requests, "the replier never called the agent's model"
    assert during["messages"] == 1 and deleted["messages"] == 1
    assert set(tenant_row_counts(servers.database, account.tenant_id).values()) == {0}
    assert_bystander_untouched(servers, bystander)
    prefix = account.username.removesuffix("slow")
    args = ["--cleanup-prefix", prefix, "--database-url", servers.database.url]
    if servers.database.app_role:
        args += ["--database-app-role", servers.database.app_role]
    assert run_cli(args)[0] == 0


def test_a_connection_left_open_after_tenant_deletion_stores_nothing(servers, bystander):
    """The owner deletes the tenant while a client is still connected with one of its keys."""

    async def late_message() -> tuple[Account, str]:
        async with ConfiguratorClient(servers.configurator_url) as api:
            name = f"{new_run_prefix()}late"
            account = await api.register(name, f"{name}@example.com", PASSWORD)
            agent = await api.create_agent(account, "late agent", "efficient_helper")
            key = await api.create_api_key(account, agent["id"])
            connection = ChatConnection(servers.replier_url, key["secret"], "web", "u-1", "U", None)
            await connection.open()
            try:
                await connection.ask("before the deletion", "m-1", 20)
                await api.delete_tenant(account)
                try:
                    reply, _ = await connection.ask("after the deletion", "m-2", 5)
                    outcome = f"answered: {reply.text}"
                except ChatError as exc:  # refused: an error message, a closed connection or silence
                    outcome = f"refused: {exc}"
            finally:
                await connection.close()
            return account, outcome

    account, outcome = run(late_message())
    assert outcome.startswith("refused"), outcome
    assert set(tenant_row_counts(servers.database, account.tenant_id).values()) == {0}
    assert_bystander_untouched(servers, bystander)
    args = ["--cleanup-prefix", account.username.removesuffix("late"), "--database-url", servers.database.url]
    if servers.database.app_role:
        args += ["--database-app-role", servers.database.app_role]
    assert run_cli(args)[0] == 0
