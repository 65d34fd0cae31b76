"""The runner's checks and failure reporting, in-process, against test doubles.

The end-to-end tests drive the happy paths against real backends; the paths here are the runner's own
logic: what it concludes from answers a healthy configurator or replier never gives (a stream on the
wrong platform, a history that differs, a login that still works after cleanup, a reply addressed to
another group), and that every such answer ends up in the report instead of crashing it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import httpx
import pytest
from rich.console import Console
from rich.progress import Progress

from integration_tests import runner as runner_module
from integration_tests.api import Account
from integration_tests.chat import ChatConnection, ChatError, Reply
from integration_tests.generator import DEFAULT_TOPICS
from integration_tests.runner import Conversation, Run, RunOptions
from integration_tests.test_end_to_end import run
from isolation.cleanup import RUN_ID_LENGTH


class FakeConfigurator:
    """TEST DOUBLE of the configurator's REST API: canned answers per `METHOD /path` (below `/api/v1`).

    An answer is `(status, json_or_text)`, an exception to raise, or a function of the request that
    returns one of those. Unknown routes answer 404. Every call is recorded.
    """

    def __init__(self, routes: dict) -> None:
        self.routes = routes
        self.calls: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.method} {request.url.path.removeprefix('/api/v1')}"
        self.calls.append(key)
        answer = self.routes.get(key, (404, {"error": {"code": "not_found"}}))
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    def attach(self, run_: Run) -> None:
        transport = httpx.MockTransport(self.handle)
        run_.api.http = httpx.AsyncClient(transport=transport, base_url="http://configurator.test/api/v1")


def account(name: str, agents: int = 0) -> Account:
    made = Account(name, f"{name}@example.com", "pw", f"acc_{name}", f"ten_{name}", f"token-{name}", "refresh")
    made.agents = [{"id": f"agt_{name}{i}", "name": f"agent {i}"} for i in range(agents)]
    return made


def by_token(answers: dict):
    """An answer that depends on whose access token the request carries."""

    def answer(request: httpx.Request):
        return answers[request.headers["Authorization"].removeprefix("Bearer token-")]

    return answer


def conversation(index: int, owner: Account, *, platform="qq", group_id="g", connection=None, **state) -> Conversation:
    connection = connection or ChatConnection(
        "ws://replier.test/ws", "mtk_x", platform, f"user{index}", "Ann", group_id
    )
    conv = Conversation(
        index, owner, f"agt_c{index}", f"agent {index}", "caring_friend", f"key{index}", connection, "tea"
    )
    for name, value in state.items():
        setattr(conv, name, value)
    return conv


def stream(sid: str, platform="qq", kind="group", group_id="g", user_id="user0") -> dict:
    return {"id": sid, "platform": platform, "kind": kind, "group_id": group_id, "user_id": user_id}


def page(*items) -> tuple[int, dict]:
    return 200, {"items": list(items), "next_offset": None}


def row(direction: str, message_id: str, text: str) -> dict:
    return {"direction": direction, "message_id": message_id, "text": text}


def new_run(**options) -> Run:
    return Run(RunOptions(use_llm=False, **options))


async def _verify(run_: Run) -> None:
    try:
        await run_.verify()
    finally:
        await run_.api.aclose()


def test_history_and_stats_checks_explain_every_mismatch():
    owner, other = account("owner", agents=2), account("other", agents=1)
    sent = {"sent": ["q0", "q1"], "sent_ids": ["m0", "m1"], "received": ["a0", "a1"]}
    stored = [row("in", "m0", "q0"), row("out", "mt-reply:m0", "a0"), row("in", "m1", "q1")]
    r = new_run(messages=2)
    r.accounts = [owner, other]
    r.conversations = [
        conversation(0, owner),  # never sent anything, and no stream: fine
        conversation(1, owner),  # never sent anything, yet a stream exists
        conversation(2, owner, **sent),  # two streams for one conversation
        # the stream is on another platform, replies named another stream, the last reply was not stored
        conversation(3, owner, **sent, chat_stream_ids={"cs_elsewhere"}),
        conversation(4, owner, group_id=None, **sent),  # the stored texts differ at position 1
        conversation(5, other, **sent),  # the configurator fails
    ]
    FakeConfigurator(
        {
            "GET /agents/agt_c0/chat-streams": page(),
            "GET /agents/agt_c1/chat-streams": page(stream("cs_1")),
            "GET /agents/agt_c2/chat-streams": page(stream("cs_2a"), stream("cs_2b")),
            "GET /agents/agt_c3/chat-streams": page(stream("cs_3", platform="wechat")),
            "GET /chat-streams/cs_3/messages": page(*reversed(stored)),
            "GET /agents/agt_c4/chat-streams": page(stream("cs_4", kind="private", group_id=None, user_id="user4")),
            "GET /chat-streams/cs_4/messages": page(*reversed([*stored[:1], row("out", "mt-reply:m0", "??")])),
            "GET /agents/agt_c5/chat-streams": (500, "Internal Server Error"),
            "GET /tenant/stats": by_token(
                {
                    "owner": (200, {"agents": 2, "api_keys": 2, "active_api_keys": 1, "members": 1}),
                    "other": (503, {"error": {"code": "unavailable", "message": "stats are down"}}),
                }
            ),
        }
    ).attach(r)

    run(_verify(r))

    history = {c.index: c.history for c in r.conversations}
    assert history[0] == {"ok": True, "count": 0, "chat_stream_id": None, "problems": []}
    assert history[1]["ok"] is False
    assert history[2] == {"ok": False, "count": 0, "chat_stream_id": None, "problems": ["2 chat streams"]}
    assert (
        history[3]["ok"] is False
        and history[3]["count"] == 3
        and history[3]["problems"]
        == [
            "stream is wechat/group/g",
            "replies named streams ['cs_elsewhere'], stored cs_3",
            "history differs: 3 stored vs 4 exchanged",  # the stored part matches: no "first difference"
        ]
    )
    assert history[4]["problems"] == ["history differs: 2 stored vs 4 exchanged, first difference at position 1"]
    assert history[5]["ok"] is False
    assert history[5]["problems"] == ["GET /agents/agt_c5/chat-streams -> 500: Internal Server Error"]
    owner_stats, other_stats = r.stats
    assert owner_stats["ok"] is False
    # only what differs: 2 active keys expected (1 got); 3 streams with messages (c2..c4) expected (none got)
    assert owner_stats["mismatches"]["active_api_keys"] == {"expected": 2, "got": 1}
    assert owner_stats["mismatches"]["chat_streams"] == {"expected": 3, "got": None}
    assert "agents" not in owner_stats["mismatches"]
    assert other_stats == {
        "username": "other",
        "ok": False,
        "error": "GET /tenant/stats -> 503: {'code': 'unavailable', 'message': 'stats are down'}",
    }
    assert r.errors[0].startswith("tenant stats of owner: {'active_api_keys'")
    assert r.errors[1] == f"tenant stats of other: {other_stats['error']}"
    report = r.build_report(1.0, {})
    assert report["ok"] is False and report["totals"]["conversations_ok"] == 0


def test_a_verify_step_that_crashes_is_reported_and_cleanup_still_runs():
    """A transport error (not an API answer) during verification: the run reports it and goes on."""
    owner = account("owner", agents=1)
    r = new_run(users=1, agents=1, messages=1)

    async def skip() -> None:
        return None

    r.check_health = r.setup = r.connect = r.converse = skip
    r.accounts = [owner]
    r.conversations = [conversation(0, owner, sent=["q"], sent_ids=["m0"], received=["a"], connected=True)]
    fake = FakeConfigurator(
        {
            "GET /agents/agt_c0/chat-streams": httpx.ConnectError("connection refused"),
            "DELETE /auth/me": (200, {"deleted": {"accounts": 1, "tenants": 1, "agents": 1}}),
            "POST /auth/login": (401, {"error": {"code": "unauthorized"}}),
            "GET /tenant": (401, {"error": {"code": "unauthorized"}}),
        }
    )
    fake.attach(r)

    report = run(r.execute())

    assert report["errors"] == ["verify: ConnectError: connection refused"]
    assert set(report["phase_s"]) == {"health", "setup", "connect", "conversations", "verify", "cleanup"}
    assert report["tenant_stats"] == [] and report["ok"] is False
    assert "DELETE /auth/me" in fake.calls
    cleanup = report["cleanup"]
    assert cleanup["mode"] == "http" and cleanup["complete"] is True
    assert cleanup["deleted"] == {"accounts": 1, "agents": 1, "tenants": 1}
    assert cleanup["login_status_after"] == {"401": 1} and cleanup["accounts_left"] == 0 and "note" not in cleanup


def test_every_cleanup_failure_is_reported(tmp_path):
    """DELETE /auth/me fails, the database has no schema, a login and a tenant still work afterwards."""
    stuck, gone = account("stuck"), account("gone")
    r = new_run(database_url=f"sqlite:///{tmp_path / 'no-schema.db'}")
    r.accounts = [stuck, gone]
    FakeConfigurator(
        {
            "DELETE /auth/me": by_token({"stuck": (500, "boom"), "gone": (200, {"deleted": {"tenants": 1}})}),
            "POST /auth/login": lambda request: (200, {}) if b'"stuck"' in request.content else (401, {}),
            "GET /tenant": by_token({"stuck": (200, {"id": "ten_stuck"}), "gone": (404, {})}),
        }
    ).attach(r)

    async def cleanup() -> None:
        try:
            await r.cleanup()
        finally:
            await r.api.aclose()

    run(cleanup())

    report = r.cleanup_report
    assert report["mode"] == "http+database" and report["complete"] is False
    assert report["deleted"] == {"tenants": 1} and report["login_status_after"] == {"200": 1, "401": 1}
    assert report["accounts_left"] == 1 and f"--cleanup-prefix {r.prefix}" in report["note"]
    failures = report["failures"]
    assert failures[0] == "DELETE /auth/me as stuck: DELETE /auth/me -> 500: boom"
    assert failures[1].startswith("prefix cleanup in the database: SchemaVersionError: database schema is at version 0")
    assert failures[2:] == ["stuck can still log in", "tenants still reachable: ['stuck']"]
    assert r.errors == failures


def test_accounts_left_by_the_prefix_cleanup_make_it_incomplete(monkeypatch):
    r = new_run(database_url="sqlite:///unused.db")
    calls = []

    def leaves_one(prefix, url, role, *, force):
        calls.append((prefix, url, role, force))
        return {"deleted": {"accounts": 2}, "accounts_left": [f"{prefix}u0"]}

    monkeypatch.setattr(runner_module, "delete_prefix_in_database", leaves_one)
    run(r.cleanup())
    run(r.api.aclose())
    assert calls == [(r.prefix, "sqlite:///unused.db", None, True)]  # the run's own prefix
    assert r.cleanup_report["failures"] == [f"accounts left after prefix cleanup: ['{r.prefix}u0']"]
    assert r.cleanup_report["complete"] is False and r.cleanup_report["deleted"] == {"accounts": 2}


@dataclass
class ScriptedConnection(ChatConnection):
    """TEST DOUBLE of a maim_message connection: `ask` answers from `script` (a reply factory or an error)."""

    script: list = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    async def ask(self, text: str, message_id: str, timeout: float, **kwargs) -> tuple[Reply, float]:
        self.asked.append(message_id)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step(message_id), 0.025


def reply(group_id="g", **metadata):
    def make(message_id: str) -> Reply:
        meta = {"reply_to": message_id, "chat_stream_id": "cs_1", "offline": True, **metadata}
        return Reply(f"answer to {message_id}", f"mt-reply:{message_id}", message_id, meta, group_id, None, 0.0)

    return make


def test_conversations_check_every_reply_and_progress_counts_every_message():
    owner = account("owner", agents=3)
    script = [reply(group_id="other"), reply(error="x", chat_stream_id=None)]
    strange = ScriptedConnection("ws://replier.test/ws", "mtk_x", "qq", "user0", "Ann", "g", script=script)
    failing = ScriptedConnection(
        "ws://replier.test/ws", "mtk_y", "web", "user2", "Bao", None, script=[ChatError("no reply to m within 1 s")]
    )
    r = new_run(users=1, agents=3, messages=2, transcripts=True)
    r.progress = Progress(console=Console(file=io.StringIO()))
    r.accounts = [owner]
    r.conversations = [
        conversation(0, owner, connection=strange, connected=True),
        conversation(1, owner),  # its connection could not be opened
        conversation(2, owner, connection=failing, connected=True),
    ]

    async def converse() -> None:
        # a reply nobody asked for is already waiting when the conversation ends
        await strange.replies.put(reply()("someone-else"))
        await r.converse()
        await r.api.aclose()

    run(converse())

    first, skipped, failed = r.conversations
    prefix = r.prefix
    assert first.errors == [
        "message 0: reply addressed to group 'other'",
        "message 1: replier reported x",
        "1 unexpected replies: ['mt-reply:someone-else']",
    ]
    assert first.received == [f"answer to {prefix}c0m0", f"answer to {prefix}c0m1"]
    assert first.chat_stream_ids == {"cs_1"} and first.offline_replies == 2 and first.latencies == [0.025] * 2
    assert skipped.sent == [] and skipped.errors == []
    assert failed.sent_ids == [f"{prefix}c2m0"] and failed.received == []
    assert failed.errors == ["message 0: no reply to m within 1 s"]
    # the progress bar reaches its total even though two conversations stopped early
    (task,) = r.progress.tasks
    assert task.total == 6 and task.completed == 6
    report = r.build_report(0.5, {})
    assert [c["ok"] for c in report["conversations"]] == [False, False, False]
    assert report["conversations"][2]["transcript"] == [{"role": "user", "text": failed.sent[0]}]
    assert [t["role"] for t in report["conversations"][0]["transcript"]] == ["user", "agent", "user", "agent"]
    assert report["totals"]["messages_sent"] == 3 and report["totals"]["replies_received"] == 2
    assert report["latency_ms"]["count"] == 2 and report["latency_ms"]["p50"] == 25.0
    assert "mtk_" not in json.dumps(report)


def test_delete_prefix_in_database_refuses_a_database_without_schema_and_a_short_prefix(tmp_path):
    from isolation.migrate import SchemaVersionError

    empty = tmp_path / "empty.db"
    with pytest.raises(SchemaVersionError, match="schema is at version 0"):
        runner_module.delete_prefix_in_database("it_", f"sqlite:///{empty}", force=True)
    empty.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="shorter than a run id"):
        runner_module.delete_prefix_in_database("it_", f"sqlite:///{empty}")
    assert not empty.exists()  # refused before the database was even opened
    assert len(runner_module.new_run_prefix()) == RUN_ID_LENGTH + 1  # a run's own prefix needs no --force


def test_run_urls_and_prefixes():
    from datetime import UTC, datetime

    prefix = runner_module.new_run_prefix(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert prefix.startswith("it_20260102030405_") and prefix.endswith("_") and len(prefix) == len("it_") + 14 + 8
    assert runner_module.replier_http_url("wss://example.org:443/ws") == "https://example.org:443"
    assert runner_module.replier_ws_url("http://127.0.0.1:8095") == "ws://127.0.0.1:8095/ws"
    assert runner_module.replier_ws_url("https://example.org/custom/") == "wss://example.org/custom"


def test_setup_goes_on_when_one_users_agents_cannot_be_created():
    """The configurator refuses one user's agent: that user has no conversation, the others go on."""
    r = new_run(users=2, agents=1, messages=1)

    def register(request: httpx.Request):
        name = json.loads(request.content)["username"]
        tokens = {"access_token": f"token-{name}", "refresh_token": "r"}
        return 201, {"account": {"id": f"acc_{name}"}, "tenant": {"id": f"ten_{name}"}, "tokens": tokens}

    def create_agent(request: httpx.Request):
        if request.headers["Authorization"].endswith("u1"):
            return 500, "agent store down"
        body = json.loads(request.content)
        return 201, {"id": "agt_0", "name": body["name"], "template_id": body["template_id"]}

    FakeConfigurator(
        {
            "POST /auth/register": register,
            "GET /agent-templates": (200, {"items": []}),  # no templates: agents without one
            "POST /agents": create_agent,
            "POST /agents/agt_0/api-keys": (201, {"id": "key_0", "secret": "mtk_secret"}),
        }
    ).attach(r)

    async def setup() -> None:
        try:
            await r.setup()
        finally:
            await r.api.aclose()

    run(setup())

    prefix = r.prefix
    assert sorted(a.username for a in r.accounts) == [f"{prefix}u0", f"{prefix}u1"]
    assert r.errors == ["agents/keys: POST /agents -> 500: agent store down"]
    (conv,) = r.conversations
    assert (conv.account.username, conv.agent_id, conv.key_id) == (f"{prefix}u0", "agt_0", "key_0")
    assert conv.template_id is None
    assert conv.topic in DEFAULT_TOPICS and conv.connection.api_key == "mtk_secret"
    assert (conv.connection.platform, conv.connection.group_id) == ("qq", f"{prefix}group0_0")
    assert r.build_report(0.1, {})["created"]["api_keys"] == [{"agent_id": "agt_0", "key_id": "key_0"}]
