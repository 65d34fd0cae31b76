"""Same-run figures for a replier crash (kill -9), a graceful stop (SIGTERM) and an impatient stop
(SIGTERM, then SIGINT) during slow LLM calls.

A script, not a test. It starts a fake OpenAI-compatible server (the test double of
tests/replier/fake_openai.py, a model that takes `--llm-seconds`), a throw-away database with one
tenant, agent and API key, a replier from `--code-dir`, and one maim_message `WebSocketClient`
(which reconnects by itself after a crash) that sends `--messages` messages over several chats plus a
few in one chat. Then:

* `--fault kill9`: once the acks are in (or after a short fixed wait) and LLM calls are in flight,
  kill -9 the replier, start it again from the same code dir and wait up to `--wait` seconds for
  replies. Prints messages sent, acks and replies the client got (distinct reply-to ids and total,
  so duplicates show), inbound rows stored and inbound rows with no reply row at the end.
* `--fault sigterm` (model delay 15 s unless `--llm-seconds` says otherwise): SIGTERM while the calls
  are in flight, with the code's default shutdown grace, then prints the acks, the replies received
  before the process exited, inbound rows unanswered at exit, replies stored but not delivered
  (`delivered_at IS NULL` on reply rows, null when the schema has no such column, and stored replies
  the client never received) and whether `replier stopped` was logged.
* `--fault sigterm-sigint`: as `sigterm`, then SIGINT `--second-signal-after` seconds (2) after the
  SIGTERM: what an operator (or a supervisor) does who will not wait. Issue 12 saw the second signal
  skip the store stop and the usage flush. Adds the seconds to exit after the first signal and whether
  the API key's use was flushed: its `api_keys.last_used_at` (written only by the usage flush, every
  `USAGE_FLUSH_SECONDS`, and once more at shutdown) NULL before the SIGTERM and set after the exit.
  The periodic flush is pushed out to an hour so that only the shutdown flush can set it.

    python perf/crash_run.py --fault kill9 --database sqlite
    python perf/crash_run.py --fault kill9 --database sqlite --code-dir /tmp/before   # an older tree
    python perf/crash_run.py --fault sigterm-sigint --database postgresql --second-signal-after 2

`--code-dir` (e.g. `git archive <commit> | tar -x -C DIR`) runs the replier from that tree, and this
script's database provisioning and rows (testsupport, isolation) come from the same tree, so an older
replier gets the schema it accepts. Run it as a file (`python perf/crash_run.py`), not with `-m`, so
the tree named by `--code-dir` comes first on the import path.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent  # this checkout: the fake LLM always comes from here
ACK_LINE = "收到 ACK 确认"  # maim_message's client logs this (debug) for every sys_ack it receives
SAME_CHAT = 4  # this many of the messages go to one chat (answered in order), the rest over 8 chats
NO_PERIODIC_FLUSH = "3600"  # sigterm-sigint: USAGE_FLUSH_SECONDS, so only the shutdown flush records key use


class _Counter(logging.Handler):
    """Counts the acks maim_message's client logs, the only place it reports them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.acks: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if ACK_LINE in text:
            self.acks.add(text.rsplit("=", 1)[-1].strip())


def _fake_llm_class() -> Any:
    """FakeOpenAI (the LLM test double) from this checkout: older trees' copy lacks `fake-sleep-<s>`."""
    spec = importlib.util.spec_from_file_location("crash_run_fake_openai", HERE / "tests/replier/fake_openai.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeOpenAI


def _replier_env(database: Any, port: int, code_dir: Path, fault: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "SHUTDOWN_GRACE_SECONDS")}
    if fault == "sigterm-sigint":
        env["USAGE_FLUSH_SECONDS"] = NO_PERIODIC_FLUSH
    env["DATABASE_URL"] = database.url
    env["HOST"], env["PORT"] = "127.0.0.1", str(port)
    env["LOG_LEVEL"], env["PYTHONPATH"] = "info", str(code_dir)
    env["LLM_PROVIDER"] = ""
    env["LLM_ALLOWED_HOSTS"] = "127.0.0.1"  # the fake LLM listens on loopback (egress rule of newer code)
    if database.app_role:
        env["DATABASE_APP_ROLE"] = database.app_role
    return env


def _setup(database: Any, base_url: str, model: str) -> tuple[str, str]:
    """A tenant, an agent on the fake model and an API key, with the code dir's isolation layer."""
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db

    isolation_db.configure(database.url, app_role=database.app_role)
    suffix = secrets.token_hex(4)
    account = system.create_account(f"cr{suffix}", f"cr{suffix}@example.com", "not-a-real-hash")
    tenant = system.create_tenant(f"crash run {suffix}", account["id"])
    scoped = Scoped(IsolationContext(tenant["id"]))
    llm = {"provider": "openai", "base_url": base_url, "model": model}
    agent = scoped.agents.create(name=f"cr{suffix}", persona={}, config={}, llm=llm)
    _, key = scoped.api_keys.create(agent["id"], name="crash run")
    isolation_db.close_database()
    return tenant["id"], key


def _select(database: Any, query: str, tenant_id: str) -> list[tuple]:
    """`query` (ending in `tenant_id = `) for the tenant, run as the owner (no RLS)."""
    if database.kind == "sqlite":
        import sqlite3

        with sqlite3.connect(database.admin_url.removeprefix("sqlite:///")) as conn:
            return conn.execute(query + "?", (tenant_id,)).fetchall()
    import psycopg

    from testsupport.databases import _conninfo

    with psycopg.connect(_conninfo(database.admin_url)) as conn:
        return conn.execute(query + "%s", (tenant_id,)).fetchall()


def _key_last_used(database: Any, tenant_id: str) -> bool | None:
    """Whether the tenant's (only) API key has a `last_used_at`; None when the schema has no such column."""
    try:
        rows = _select(database, "SELECT last_used_at FROM api_keys WHERE tenant_id = ", tenant_id)
    except Exception as exc:  # an older schema without the column: report null, do not crash
        print(f"api_keys.last_used_at unreadable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return bool(rows) and rows[0][0] is not None


def _rows(database: Any, tenant_id: str) -> dict[str, Any]:
    """Inbound and reply rows of the tenant, read as the owner (no RLS on the count). A schema without
    `messages.delivered_at` (schema 3, e.g. 667f891) gives `undelivered_marks` None."""
    try:
        query = "SELECT message_id, direction, delivered_at FROM messages WHERE tenant_id = "
        rows = _select(database, query, tenant_id)
        marked = True
    except Exception as exc:
        print(f"messages.delivered_at unreadable: {type(exc).__name__}: {exc}", file=sys.stderr)
        query = "SELECT message_id, direction, NULL FROM messages WHERE tenant_id = "
        rows = _select(database, query, tenant_id)
        marked = False
    inbound = {m for m, d, _ in rows if d == "in"}
    replies = {m.removeprefix("mt-reply:"): delivered for m, d, delivered in rows if d != "in"}
    return {
        "inbound": inbound,
        "replies": replies,
        "unanswered": sorted(inbound - set(replies)),
        "undelivered_marks": sum(1 for delivered in replies.values() if delivered is None) if marked else None,
    }


def _message(i: int, run: str, platform: str = "qq") -> Any:
    from maim_message.message import APIMessageBase, BaseMessageInfo, MessageDim, Seg, SenderInfo, UserInfo

    user = "one-chat" if i < SAME_CHAT else f"chat-{i % 8}"
    sender = SenderInfo(group_info=None, user_info=UserInfo(platform, user, None))
    return APIMessageBase(
        message_info=BaseMessageInfo(platform=platform, message_id=f"{run}-{i}", time=time.time(), sender_info=sender),
        message_segment=Seg("text", f"crash run message {i}"),
        message_dim=MessageDim(api_key="ignored", platform=platform),
    )


async def _until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def _scenario(
    args: argparse.Namespace, replier: Any, url: str, key: str, fake: Any, run: str, key_used: Callable[[], bool | None]
) -> dict:
    from maim_message.client import WebSocketClient
    from maim_message.ws_config import ClientConfig

    received: list[str] = []
    last_reply_at = [0.0]

    async def on_message(message: Any, _meta: Any) -> None:
        received.append(message.message_info.message_id.removeprefix("mt-reply:"))
        last_reply_at[0] = time.monotonic()

    counter = _Counter()
    logger = logging.getLogger(f"crash-run-{run}")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(counter)
    config = ClientConfig(url=url, api_key=key, platform="qq", on_message=on_message, custom_logger=logger)
    config.reconnect_delay, config.max_reconnect_delay = 0.5, 1.0
    client = WebSocketClient(config)
    await client.start()
    assert await client.connect(), "the maim client could not connect"
    result: dict[str, Any] = {}
    try:
        asked = len(fake.requests)
        sent = 0
        for i in range(args.messages):
            sent += bool(await client.send_message(_message(i, run)))
        result["messages_sent"] = sent
        # Older code acks on receipt, newer code once stored: wait for the acks, at most a short while.
        await _until(lambda: len(counter.acks) >= sent, 5.0)
        await _until(lambda: len(fake.requests) > asked, 10.0)
        await asyncio.sleep(0.5)  # the other streams' calls start too
        result["llm_calls_in_flight_at_fault"] = len(fake.requests) - asked
        result["acks_at_fault"] = len(counter.acks)
        if args.fault == "kill9":
            replier.process.kill()
            replier.process.wait(10)
            replier.start()
            replier.wait_healthy(60)
            restarted = time.monotonic()
            await _until(lambda: len(set(received)) >= sent, args.wait, 0.2)
            if last_reply_at[0] > restarted:
                result["seconds_from_restart_to_last_reply"] = round(last_reply_at[0] - restarted, 1)
        elif args.fault == "sigterm":
            replier.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            await _until(lambda: replier.process.poll() is not None, 180.0)
            result["seconds_to_exit_after_sigterm"] = round(time.monotonic() - started, 1)
        else:
            result["key_last_used_at_set_before_signal"] = key_used()
            replier.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            exited = await _until(lambda: replier.process.poll() is not None, args.second_signal_after)
            result["second_signal_sent"] = not exited
            if not exited:
                replier.process.send_signal(signal.SIGINT)
            await _until(lambda: replier.process.poll() is not None, 180.0)
            result["seconds_to_exit_after_first_signal"] = round(time.monotonic() - started, 1)
            result["exit_code"] = replier.process.poll()
        result["acks_received"] = len(counter.acks)
        result["replies_received_distinct"] = len(set(received))
        result["replies_received_total"] = len(received)
        result["received_ids"] = set(received)
    finally:
        await asyncio.wait_for(client.stop(), 15)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=("kill9", "sigterm", "sigterm-sigint"), required=True)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--code-dir", type=Path, default=HERE)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--llm-seconds", type=float, default=None, help="default: 3 (kill9), 15 (sigterm*)")
    parser.add_argument("--wait", type=float, default=30.0, help="kill9: seconds to wait for replies")
    parser.add_argument(
        "--second-signal-after", type=float, default=2.0, help="sigterm-sigint: seconds from SIGTERM to SIGINT"
    )
    args = parser.parse_args(argv)
    code_dir = args.code_dir.resolve()
    sys.path.insert(0, str(code_dir))  # provisioning and rows with the code dir's own schema
    # Started in the background by a shell, this script has SIGINT ignored, and so would the replier
    # (an ignored signal survives exec; older trees' ServerProcess does not reset it): a handler here
    # is reset to the default in the child, so the sigterm-sigint fault's SIGINT really arrives.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    llm_seconds = args.llm_seconds if args.llm_seconds is not None else (3.0 if args.fault == "kill9" else 15.0)
    from testsupport.databases import provision_database
    from testsupport.servers import ServerProcess, free_port

    folder = Path(tempfile.mkdtemp(prefix="crash-run-"))
    log = folder / "replier.log"
    fake = _fake_llm_class()().start()
    run = f"cr{secrets.token_hex(3)}"
    try:
        with provision_database(args.database) as database:
            tenant_id, key = _setup(database, fake.base_url, f"fake-sleep-{llm_seconds:g}")
            port = free_port()
            replier = ServerProcess(
                "replier",
                [sys.executable, "-m", "replier"],
                env=_replier_env(database, port, code_dir, args.fault),
                log_path=log,
                health_url=f"http://127.0.0.1:{port}/health",
                cwd=code_dir,
            )
            replier.start()
            try:
                replier.wait_healthy(60)
                url = f"ws://127.0.0.1:{port}/ws"
                key_used = functools.partial(_key_last_used, database, tenant_id)
                result = asyncio.run(_scenario(args, replier, url, key, fake, run, key_used))
            finally:
                replier.stop()
            rows = _rows(database, tenant_id)
            key_used_at_end = _key_last_used(database, tenant_id)
    finally:
        fake.stop()
    received = result.pop("received_ids")
    report = {"fault": args.fault, "database": args.database, "code": str(code_dir), "llm_seconds": llm_seconds}
    report.update(result)
    report["inbound_rows_stored"] = len(rows["inbound"])
    report["inbound_rows_unanswered"] = len(rows["unanswered"])
    report["reply_rows_stored"] = len(rows["replies"])
    if args.fault != "kill9":
        report["reply_rows_delivered_at_null"] = rows["undelivered_marks"]
        report["reply_rows_not_received_by_client"] = len(set(rows["replies"]) - received)
        report["replier_stopped_logged"] = "replier stopped" in log.read_text("utf-8", "replace")
    if args.fault == "sigterm-sigint":
        report["key_last_used_at_set_after_exit"] = key_used_at_end
        before = report.get("key_last_used_at_set_before_signal")
        flushed = None if key_used_at_end is None else bool(key_used_at_end and not before)
        report["key_use_flushed_at_shutdown"] = flushed
    print(json.dumps(report, indent=2))
    print(f"replier log: {log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
