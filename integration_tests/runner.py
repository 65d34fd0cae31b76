"""One end-to-end run: register users, create agents and keys, chat over maim_message, verify, clean up.

Everything goes through the public interfaces a customer uses: the configurator's REST API and the
replier's maim_message endpoint, including the cleanup (each account deletes itself with
`DELETE /auth/me`). Only the optional prefix cleanup (`--database-url`: whatever an interrupted run left
behind) and `--cleanup-prefix` use the database directly, through `isolation.cleanup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from integration_tests.api import Account, ApiError, ConfiguratorClient
from integration_tests.chat import ChatConnection, ChatError, close_all
from integration_tests.generator import Generator, LlmSettings
from integration_tests.report import latency_summary

PLATFORMS = ("qq", "wechat", "discord", "web")
NAMES = ("Alice", "Bao", "Chen", "Dana", "Emeka", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena")


def new_run_prefix(now: datetime | None = None) -> str:
    """`it_<yyyymmddhhmmss>_<hex>_`: unique per run, and what `--cleanup-prefix` matches."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    return f"it_{stamp}_{secrets.token_hex(3)}_"


def replier_http_url(replier_url: str) -> str:
    """`ws://host:port/ws` -> `http://host:port` (where /health lives)."""
    parts = urlsplit(replier_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    return f"{scheme}://{parts.netloc}"


def replier_ws_url(replier_url: str) -> str:
    """Accept `http://host:port`, `ws://host:port` or the full `ws://host:port/ws`."""
    parts = urlsplit(replier_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme or "ws")
    path = parts.path.rstrip("/") or "/ws"
    return f"{scheme}://{parts.netloc}{path}"


@dataclass
class RunOptions:
    users: int = 3
    agents: int = 2
    messages: int = 5
    concurrency: int = 10
    configurator_url: str = "http://127.0.0.1:8000"
    replier_url: str = "ws://127.0.0.1:8095/ws"
    cleanup: bool = True
    timeout: float = 30.0
    database_url: str | None = None
    database_app_role: str | None = None
    password: str | None = None
    transcripts: bool = False
    use_llm: bool = True
    prefix: str | None = None


@dataclass
class Conversation:
    index: int
    account: Account
    agent_id: str
    agent_name: str
    template_id: str | None
    key_id: str
    connection: ChatConnection
    topic: str
    sent: list[str] = field(default_factory=list)
    sent_ids: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    offline_replies: int = 0
    chat_stream_ids: set[str] = field(default_factory=set)
    connected: bool = False
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "group" if self.connection.group_id else "private"

    def ok(self, expected_messages: int) -> bool:
        return (
            self.connected
            and not self.errors
            and len(self.sent) == expected_messages
            and len(self.received) == expected_messages
            and self.history.get("ok", False)
        )


class Run:
    """State and steps of one run; `execute()` does everything and returns the report dict."""

    def __init__(self, options: RunOptions, progress=None) -> None:
        self.options = options
        self.prefix = options.prefix or new_run_prefix()
        self.password = options.password or secrets.token_urlsafe(18)
        self.progress = progress
        self.api = ConfiguratorClient(options.configurator_url, max_connections=max(options.concurrency, 4))
        self.ws_url = replier_ws_url(options.replier_url)
        self.generator = Generator(LlmSettings.from_environment() if options.use_llm else None)
        self.accounts: list[Account] = []
        self.conversations: list[Conversation] = []
        self.errors: list[str] = []
        self.stats: list[dict] = []
        self.cleanup_report: dict[str, Any] = {"mode": "skipped"}
        self.started = datetime.now(UTC)
        self.interrupted = False
        self.report: dict | None = None  # kept here too: asyncio.run raises KeyboardInterrupt after a Ctrl-C
        self._tasks: dict[str, Any] = {}

    # -- progress --------------------------------------------------------------------------------
    def _task(self, name: str, description: str, total: int) -> None:
        if self.progress is not None:
            self._tasks[name] = self.progress.add_task(description, total=total)

    def _advance(self, name: str, amount: int = 1) -> None:
        if self.progress is not None and name in self._tasks:
            self.progress.advance(self._tasks[name], amount)

    # -- steps -----------------------------------------------------------------------------------
    async def check_health(self) -> None:
        await self.api.health()
        url = replier_http_url(self.options.replier_url) + "/health"
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"replier at {url} is not healthy: HTTP {response.status_code}")

    async def setup(self) -> None:
        o = self.options
        self._task("setup", "register users, agents, keys", o.users * (1 + 2 * o.agents))
        gate = asyncio.Semaphore(max(1, o.concurrency))

        async def register(u: int) -> tuple[int, Account]:
            username = f"{self.prefix}u{u}"
            async with gate:
                account = await self.api.register(username, f"{username}@example.com", self.password)
            self._advance("setup")
            return u, account

        user_index: dict[str, int] = {}
        results = await asyncio.gather(*(register(u) for u in range(o.users)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.errors.append(f"register: {result}")
            else:
                user_index[result[1].username] = result[0]
                self.accounts.append(result[1])
        if not self.accounts:
            raise RuntimeError("no account could be registered: " + "; ".join(self.errors[-3:]))
        template_ids = [t["id"] for t in await self.api.templates(self.accounts[0])] or [None]

        async def make_agents(u: int, account: Account) -> list[Conversation]:
            made = []
            for a in range(o.agents):
                template_id = template_ids[(u + a) % len(template_ids)]
                index = u * o.agents + a
                async with gate:
                    agent = await self.api.create_agent(
                        account, f"{self.prefix}agent{u}_{a}", template_id, description="integration test agent"
                    )
                    account.agents.append(agent)
                    self._advance("setup")
                    key = await self.api.create_api_key(account, agent["id"], name=f"{self.prefix}key{u}_{a}")
                    self._advance("setup")
                platform = PLATFORMS[index % len(PLATFORMS)]
                connection = ChatConnection(
                    url=self.ws_url,
                    api_key=key["secret"],
                    platform=platform,
                    user_id=f"{self.prefix}user{u}_{a}",
                    nickname=NAMES[index % len(NAMES)],
                    group_id=None if index % 3 == 2 else f"{self.prefix}group{u}_{a}",
                )
                made.append(
                    Conversation(
                        index=index,
                        account=account,
                        agent_id=agent["id"],
                        agent_name=agent["name"],
                        template_id=template_id,
                        key_id=key["id"],
                        connection=connection,
                        topic=self.generator.topic(template_id),
                    )
                )
            return made

        results = await asyncio.gather(
            *(make_agents(user_index[a.username], a) for a in self.accounts), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                self.errors.append(f"agents/keys: {result}")
            else:
                self.conversations.extend(result)
        self.conversations.sort(key=lambda c: c.index)

    async def connect(self) -> None:
        self._task("connect", "open maim_message connections", len(self.conversations))
        gate = asyncio.Semaphore(max(1, min(self.options.concurrency * 2, 100)))

        async def open_one(conv: Conversation) -> None:
            async with gate:
                try:
                    await conv.connection.open()
                    conv.connected = True
                except ChatError as exc:
                    conv.errors.append(str(exc))
            self._advance("connect")

        await asyncio.gather(*(open_one(c) for c in self.conversations))

    async def converse(self) -> None:
        o = self.options
        self._task("messages", "conversations (messages answered)", len(self.conversations) * o.messages)
        gate = asyncio.Semaphore(max(1, o.concurrency))

        async def talk(conv: Conversation) -> None:
            if not conv.connected:
                self._advance("messages", o.messages)
                return
            async with gate:
                history: list[tuple[str, str]] = []
                for i in range(o.messages):
                    text = await self.generator.next_message(
                        i,
                        name=conv.connection.nickname,
                        topic=conv.topic,
                        template_id=conv.template_id,
                        history=history,
                    )
                    message_id = f"{self.prefix}c{conv.index}m{i}"
                    try:
                        reply, latency = await conv.connection.ask(text, message_id, o.timeout)
                    except ChatError as exc:
                        conv.sent.append(text)
                        conv.sent_ids.append(message_id)
                        conv.errors.append(f"message {i}: {exc}")
                        self._advance("messages", o.messages - i)
                        return
                    conv.sent.append(text)
                    conv.sent_ids.append(message_id)
                    conv.received.append(reply.text)
                    conv.latencies.append(latency)
                    conv.offline_replies += reply.offline
                    if reply.chat_stream_id:
                        conv.chat_stream_ids.add(reply.chat_stream_id)
                    if conv.connection.group_id and reply.group_id != conv.connection.group_id:
                        conv.errors.append(f"message {i}: reply addressed to group {reply.group_id!r}")
                    if reply.metadata.get("error"):
                        conv.errors.append(f"message {i}: replier reported {reply.metadata['error']}")
                    history += [("user", text), ("agent", reply.text)]
                    self._advance("messages")
                stray = await conv.connection.drain()
                if stray:
                    conv.errors.append(f"{len(stray)} unexpected replies: {[r.message_id for r in stray][:5]}")

        await asyncio.gather(*(talk(c) for c in self.conversations))

    async def disconnect(self) -> None:
        await close_all([c.connection for c in self.conversations])

    async def verify(self) -> None:
        """Stored history per chat stream == what was exchanged; tenant stats == what was made."""
        self._task("verify", "verify history and stats", len(self.conversations) + len(self.accounts))
        gate = asyncio.Semaphore(max(1, self.options.concurrency))

        async def check(conv: Conversation) -> None:
            async with gate:
                try:
                    conv.history = await self._check_history(conv)
                except ApiError as exc:
                    conv.history = {"ok": False, "problems": [str(exc)]}
            self._advance("verify")

        async def stats(account: Account) -> dict:
            async with gate:
                mine = [c for c in self.conversations if c.account is account]
                expected = {
                    "agents": len(account.agents),
                    "api_keys": len(account.agents),
                    "active_api_keys": len(account.agents),
                    "members": 1,
                    "chat_streams": sum(1 for c in mine if c.sent),
                    "messages": sum(len(c.sent) + len(c.received) for c in mine),
                    "llm_calls": sum(len(c.received) for c in mine),
                }
                try:
                    got = await self.api.stats(account)
                except ApiError as exc:
                    self._advance("verify")
                    return {"username": account.username, "ok": False, "error": str(exc)}
                diff = {k: {"expected": v, "got": got.get(k)} for k, v in expected.items() if got.get(k) != v}
                self._advance("verify")
                return {"username": account.username, "ok": not diff, "stats": got, "mismatches": diff}

        await asyncio.gather(*(check(c) for c in self.conversations))
        self.stats = list(await asyncio.gather(*(stats(a) for a in self.accounts)))
        for entry in self.stats:
            if not entry["ok"]:
                self.errors.append(
                    f"tenant stats of {entry['username']}: {entry.get('mismatches') or entry.get('error')}"
                )

    async def _check_history(self, conv: Conversation) -> dict:
        problems: list[str] = []
        streams = await self.api.chat_streams(conv.account, conv.agent_id)
        if not conv.sent:
            return {"ok": not streams, "count": 0, "chat_stream_id": None, "problems": []}
        if len(streams) != 1:
            return {"ok": False, "count": 0, "chat_stream_id": None, "problems": [f"{len(streams)} chat streams"]}
        stream = streams[0]
        peer = conv.connection.group_id or conv.connection.user_id
        stored_peer = stream["group_id"] if conv.connection.group_id else stream["user_id"]
        if stream["platform"] != conv.connection.platform or stream["kind"] != conv.kind or stored_peer != peer:
            problems.append(f"stream is {stream['platform']}/{stream['kind']}/{stored_peer}")
        if conv.chat_stream_ids and conv.chat_stream_ids != {stream["id"]}:
            problems.append(f"replies named streams {sorted(conv.chat_stream_ids)}, stored {stream['id']}")
        rows = await self.api.messages(conv.account, stream["id"])
        expected: list[tuple[str, str, str]] = []
        for i, text in enumerate(conv.sent):
            expected.append(("in", conv.sent_ids[i], text))
            if i < len(conv.received):
                expected.append(("out", "mt-reply:" + conv.sent_ids[i], conv.received[i]))
        stored = [(r["direction"], r["message_id"], r["text"]) for r in rows]
        if stored != expected:
            first = next((i for i, (a, b) in enumerate(zip(stored, expected, strict=False)) if a != b), None)
            problems.append(
                f"history differs: {len(stored)} stored vs {len(expected)} exchanged"
                + (f", first difference at position {first}" if first is not None else "")
            )
        return {"ok": not problems, "count": len(rows), "chat_stream_id": stream["id"], "problems": problems}

    # -- cleanup ---------------------------------------------------------------------------------
    async def cleanup(self) -> None:
        self._task("cleanup", "clean up", len(self.accounts) + (1 if self.options.database_url else 0))
        deleted: Counter[str] = Counter()
        failures: list[str] = []
        mode = ["http"]
        for account in self.accounts:
            try:
                deleted.update(await self.api.delete_account(account))
            except (ApiError, httpx.HTTPError) as exc:
                failures.append(f"DELETE /auth/me as {account.username}: {exc}")
            self._advance("cleanup")
        if self.options.database_url:
            mode.append("database")
            try:
                # The run's own prefix (a whole run id unless a caller chose another): no --force to ask for.
                counts = await asyncio.to_thread(
                    delete_prefix_in_database,
                    self.prefix,
                    self.options.database_url,
                    self.options.database_app_role,
                    force=True,
                )
                deleted.update(counts["deleted"])
                if counts["accounts_left"]:
                    failures.append(f"accounts left after prefix cleanup: {counts['accounts_left']}")
            except Exception as exc:  # report every database failure, never crash the report
                failures.append(f"prefix cleanup in the database: {type(exc).__name__}: {exc}")
            self._advance("cleanup")
        # Verify through the API: no login works any more, old tokens no longer reach a tenant.
        logins = await asyncio.gather(*(self.api.login_status(a.username, self.password) for a in self.accounts))
        tenants_still_reachable = []
        for account, status in zip(self.accounts, logins, strict=True):
            if status == 200:
                failures.append(f"{account.username} can still log in")
            with contextlib.suppress(ApiError, httpx.HTTPError):
                await self.api.request("GET", "/tenant", account=account, relogin=False, expect=200)
                tenants_still_reachable.append(account.username)
        if tenants_still_reachable:
            failures.append(f"tenants still reachable: {tenants_still_reachable}")
        accounts_left = sum(1 for status in logins if status != 401)
        self.cleanup_report = {
            "mode": "+".join(mode),
            "deleted": dict(sorted(deleted.items())),
            "deleted_total": sum(deleted.values()),
            "login_status_after": dict(Counter(str(s) for s in logins)),
            "accounts_left": accounts_left,
            "complete": not failures and accounts_left == 0,
            "failures": failures,
        }
        if accounts_left:
            self.cleanup_report["note"] = (
                f"{accounts_left} account(s) of this run remain. Remove them with --cleanup-prefix {self.prefix} "
                f"--database-url URL or `invoke cleanup --prefix {self.prefix}`."
            )
        self.errors.extend(failures)

    # -- the whole run ---------------------------------------------------------------------------
    async def execute(self) -> dict:
        monotonic = time.monotonic()
        phase_times: dict[str, float] = {}
        try:
            for name, step in (
                ("health", self.check_health),
                ("setup", self.setup),
                ("connect", self.connect),
                ("conversations", self.converse),
            ):
                t0 = time.monotonic()
                await step()
                phase_times[name] = round(time.monotonic() - t0, 3)
        except Exception as exc:  # a failed step is reported; cleanup still runs below
            self.errors.append(f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:  # Ctrl-C: stop chatting, but still clean up and report
            self.interrupted = True
            self.errors.append("interrupted")
        finally:
            await self.disconnect()
        if self.conversations and not self.interrupted:
            t0 = time.monotonic()
            try:
                await self.verify()
            except Exception as exc:
                self.errors.append(f"verify: {type(exc).__name__}: {exc}")
            phase_times["verify"] = round(time.monotonic() - t0, 3)
        if self.options.cleanup:
            t0 = time.monotonic()
            await self.cleanup()
            phase_times["cleanup"] = round(time.monotonic() - t0, 3)
        await self.generator.aclose()
        await self.api.aclose()
        self.report = self.build_report(time.monotonic() - monotonic, phase_times)
        return self.report

    def build_report(self, duration: float, phase_times: dict[str, float]) -> dict:
        o = self.options
        latencies = [x for c in self.conversations for x in c.latencies]
        sent = sum(len(c.sent) for c in self.conversations)
        received = sum(len(c.received) for c in self.conversations)
        expected_conversations = o.users * o.agents
        ok_conversations = sum(1 for c in self.conversations if c.ok(o.messages))
        conversations = []
        for c in self.conversations:
            entry: dict[str, Any] = {
                "index": c.index,
                "username": c.account.username,
                "agent_id": c.agent_id,
                "template_id": c.template_id,
                "platform": c.connection.platform,
                "kind": c.kind,
                "group_id": c.connection.group_id,
                "user_id": c.connection.user_id,
                "topic": c.topic,
                "chat_stream_id": c.history.get("chat_stream_id") or next(iter(c.chat_stream_ids), None),
                "sent": len(c.sent),
                "received": len(c.received),
                "offline_replies": c.offline_replies,
                "latencies_ms": [round(x * 1000, 2) for x in c.latencies],
                "history": {k: c.history.get(k) for k in ("ok", "count", "problems")},
                "errors": c.errors,
                "ok": c.ok(o.messages),
            }
            if o.transcripts:
                entry["transcript"] = [
                    {"role": role, "text": text}
                    for pair in zip(c.sent, [*c.received, *[None] * (len(c.sent) - len(c.received))], strict=True)
                    for role, text in (("user", pair[0]), ("agent", pair[1]))
                    if text is not None
                ]
            conversations.append(entry)
        cleanup_ok = (not o.cleanup) or bool(self.cleanup_report.get("complete"))
        all_ok = (
            ok_conversations == expected_conversations
            and len(self.conversations) == expected_conversations
            and all(s["ok"] for s in self.stats)
            and cleanup_ok
            and not self.errors
        )
        return {
            "tool": "maitenant integration_tests",
            "report_version": 1,
            "started_at": self.started.isoformat().replace("+00:00", "Z"),
            "finished_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "duration_s": round(duration, 3),
            "phase_s": phase_times,
            "parameters": {
                "users": o.users,
                "agents": o.agents,
                "messages": o.messages,
                "concurrency": o.concurrency,
                "timeout_s": o.timeout,
                "configurator_url": o.configurator_url,
                "replier_url": self.ws_url,
                "cleanup": o.cleanup,
                "database_cleanup": bool(o.database_url),
                "generator": self.generator.description,
            },
            "run_prefix": self.prefix,
            "created": {
                "accounts": [
                    {"username": a.username, "account_id": a.account_id, "tenant_id": a.tenant_id}
                    for a in self.accounts
                ],
                "agents": [
                    {"username": a.username, "agent_id": g["id"], "template_id": g.get("template_id")}
                    for a in self.accounts
                    for g in a.agents
                ],
                "api_keys": [{"agent_id": c.agent_id, "key_id": c.key_id} for c in self.conversations],
            },
            "conversations": conversations,
            "totals": {
                "conversations": expected_conversations,
                "conversations_ok": ok_conversations,
                "messages_sent": sent,
                "replies_received": received,
                "offline_replies": sum(c.offline_replies for c in self.conversations),
                "success_rate": round(received / (expected_conversations * o.messages), 4)
                if expected_conversations * o.messages
                else 0.0,
                "conversation_success_rate": round(ok_conversations / expected_conversations, 4)
                if expected_conversations
                else 0.0,
                "generator_llm_messages": self.generator.llm_messages,
                "generator_llm_failures": self.generator.llm_failures,
            },
            "latency_ms": latency_summary(latencies),
            "tenant_stats": self.stats,
            "cleanup": self.cleanup_report,
            "errors": self.errors,
            "ok": all_ok,
        }


def delete_prefix_in_database(
    prefix: str, database_url: str, app_role: str | None = None, *, force: bool = False
) -> dict:
    """`isolation.cleanup.delete_by_prefix` on `database_url`: rows deleted per table, and the usernames of
    matching accounts still there (the only owners of a tenant with other members are kept)."""
    from isolation import cleanup as isolation_cleanup
    from isolation import db as isolation_db
    from isolation.migrate import check_schema

    isolation_cleanup.check_prefix(prefix, force=force)
    database = isolation_db.configure(database_url, app_role=app_role)
    try:
        check_schema(database)
        deleted = isolation_cleanup.delete_by_prefix(prefix, force=force)
        left = [a["username"] for a in isolation_cleanup.accounts_with_prefix(prefix)]
    finally:
        isolation_db.close_database()
    return {"deleted": {k: v for k, v in sorted(deleted.items())}, "accounts_left": left}
