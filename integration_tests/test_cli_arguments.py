"""The CLI's own logic, in-process and without backends: argument errors, `--cleanup-prefix` edge cases,
interruption, the printed summary, the message generator and the chat connection's reply bookkeeping."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from rich.console import Console

from integration_tests import cli
from integration_tests.chat import ChatConnection, ChatError, Reply
from integration_tests.generator import TOPICS, Generator, LlmSettings
from integration_tests.report import percentile, print_summary
from integration_tests.runner import Conversation, Run, RunOptions
from integration_tests.test_cli_runner import account
from integration_tests.test_end_to_end import FakeModel, run, run_cli


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users", "0"], "argument --users: must be at least 1"),
        (["--messages", "-3"], "argument --messages: must be at least 1"),
        (["--agents", "two"], "argument --agents: invalid _positive value: 'two'"),
        (["--timeout", "0"], "argument --timeout: must be a positive number of seconds"),
        (["--timeout", "nan"], "argument --timeout: must be a positive number of seconds"),
        (["--concurrency"], "argument --concurrency: expected one argument"),
    ],
)
def test_invalid_arguments_exit_2_and_say_why(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(args, console=Console(file=io.StringIO()))
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_urls_and_database_default_to_the_environment(monkeypatch):
    monkeypatch.setenv("MAITENANT_CONFIGURATOR_URL", "http://cfg.example:1")
    monkeypatch.setenv("MAITENANT_REPLIER_URL", "ws://rep.example:2/ws")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("DATABASE_APP_ROLE", "")
    args = cli.build_parser().parse_args([])
    assert (args.configurator_url, args.replier_url) == ("http://cfg.example:1", "ws://rep.example:2/ws")
    assert args.database_url == "sqlite:///x.db" and args.database_app_role is None
    assert (args.users, args.agents, args.messages, args.cleanup, args.llm) == (3, 2, 5, True, True)


# -- --cleanup-prefix -----------------------------------------------------------------------------
RUN_PREFIX = "it_20261122031425_532a26_"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cleanup-prefix", ""], "error: an empty cleanup prefix would match every account: refused"),
        (["--cleanup-prefix", "", "--force"], "error: an empty cleanup prefix would match every account: refused"),
        (["--cleanup-prefix", "it", "--force"], "error: a cleanup prefix needs at least 3 characters"),
        (["--cleanup-prefix", "it_"], "error: prefix 'it_' is shorter than a run id (24 characters"),
        (["--cleanup-prefix", "it_20261122"], "may match accounts of other runs or of real users; pass --force"),
        (["--cleanup-prefix", "bystander_0123456789abcdef"], "does not start with 'it_'; pass --force"),
    ],
)
def test_empty_short_and_foreign_cleanup_prefixes_exit_2_before_touching_anything(tmp_path, monkeypatch, args, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("nothing may be deleted, nor a run started")

    monkeypatch.setattr(cli, "delete_prefix_in_database", must_not_run)
    monkeypatch.setattr(cli, "Run", must_not_run)
    code, output = run_cli([*args, "--database-url", f"sqlite:///{tmp_path}/x.db"])
    assert code == 2 and message in " ".join(output.split()), output


def test_cleanup_prefix_on_a_database_without_schema_exits_1(tmp_path):
    report = tmp_path / "out.json"
    args = ["--cleanup-prefix", RUN_PREFIX, "--database-url", f"sqlite:///{tmp_path}/empty.db", "--report", str(report)]
    code, output = run_cli(args)
    assert code == 1
    assert "error: prefix cleanup failed: SchemaVersionError: database schema is at version 0" in output
    assert not report.exists()  # nothing was cleaned, nothing to report


@pytest.mark.parametrize("left", [[], ["keep_owner"]])
def test_cleanup_prefix_prints_counts_and_writes_the_report(tmp_path, monkeypatch, left):
    calls = []

    def fake_delete(prefix, url, role, *, force):
        calls.append((prefix, url, role, force))
        return {"deleted": {"accounts": 2, "tenants": 1}, "accounts_left": left}

    monkeypatch.setattr(cli, "delete_prefix_in_database", fake_delete)
    report = tmp_path / "sub" / "cleanup.json"
    args = ["--cleanup-prefix", "keep_", "--force", "--database-url", "sqlite:///db", "--database-app-role", "app"]
    code, output = run_cli([*args, "--report", str(report)])
    assert calls == [("keep_", "sqlite:///db", "app", True)]  # --force: short and without it_, accepted
    assert code == (1 if left else 0)
    assert "(prefix keep_)" in output and "accounts" in output and f"report written to {report}" in output
    assert ("accounts left (the only owners of tenants with other members): ['keep_owner']" in output) is bool(left)
    assert json.loads(report.read_text()) == {
        "cleanup_prefix": "keep_",
        "deleted": {"accounts": 2, "tenants": 1},
        "accounts_left": left,
        "ok": not left,
    }


# -- interruption ---------------------------------------------------------------------------------
def test_an_interrupt_before_the_report_exits_130_and_names_the_prefix(monkeypatch, tmp_path):
    async def interrupted(run_: Run) -> dict:
        await run_.api.aclose()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_execute", interrupted)
    report = tmp_path / "r.json"
    code, output = run_cli(["--no-progress", "--report", str(report)])
    assert code == 130
    prefix = output.split("run prefix ")[1].split()[0]
    assert f"interrupted; leftovers can be removed with --cleanup-prefix {prefix}" in output
    assert not report.exists()


def test_an_interrupt_after_the_report_still_prints_the_summary(monkeypatch):
    """Ctrl-C: the run stops chatting, cleans up and builds its report; then asyncio.run raises
    KeyboardInterrupt. The CLI still prints the summary (no --report: nothing written) and exits 1."""

    async def report_then_interrupt(run_: Run) -> dict:
        await run_.api.aclose()
        run_.interrupted = True
        run_.errors.append("interrupted")
        run_.report = run_.build_report(0.2, {})
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_execute", report_then_interrupt)
    code, output = run_cli(["--no-llm", "--no-progress", "--users", "1", "--agents", "1"])
    assert code == 1
    assert "error: interrupted" in output and output.rstrip().endswith("FAILED")
    assert "report written" not in output and "leftovers" not in output


def test_only_cancelled_errors_are_silenced(caplog):
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            cli._quiet_cancelled(loop, {"message": "task was cancelled", "exception": asyncio.CancelledError()})
            assert caplog.records == []
            cli._quiet_cancelled(loop, {"message": "connection task failed", "exception": ValueError("bad frame")})
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records] == ["connection task failed"]


# -- the printed summary --------------------------------------------------------------------------
def summary(report: dict, path: str | None = None) -> str:
    out = io.StringIO()
    print_summary(report, Console(file=out, width=200, color_system=None), path)
    return out.getvalue()


def test_a_large_failing_run_summary_is_cut_short_and_points_to_the_report():
    owner = account("owner", agents=60)
    r = Run(RunOptions(users=1, agents=60, messages=1, use_llm=False))
    r.accounts = [owner]
    for i in range(60):
        connection = ChatConnection("ws://r/ws", "k", "qq", f"user{i}", "Ann", f"g{i}")
        conv = Conversation(i, owner, f"agt{i}", "a", None, f"key{i}", connection, "tea")
        conv.errors = [f"error [{i}]"]
        r.conversations.append(conv)
    r.errors = [f"problem {i}" for i in range(25)]
    r.cleanup_report = {"mode": "http", "deleted": {"tenants": 1}, "complete": False, "note": "[keep] this"}
    text = summary(r.build_report(2.0, {}))
    assert "... and 10 more conversations in the report" in text
    assert "error: problem 19" in text and "problem 20" not in text and "... 5 more errors in the report" in text
    assert "FAILED error [0]" in text and "INCOMPLETE" in text and "note: [keep] this" in text
    assert "report written" not in text and text.rstrip().endswith("FAILED")
    assert "u0/a59" not in text and "u0/a49" in text


def test_a_summary_without_cleanup_tells_how_to_remove_the_run():
    r = Run(RunOptions(users=1, agents=1, messages=1, cleanup=False, use_llm=False))
    text = summary(r.build_report(0.1, {}), "out.json")
    assert (
        f"cleanup skipped: remove this run later with `python -m integration_tests --cleanup-prefix {r.prefix}" in text
    )
    assert "report written to out.json" in text and "- / - / -  (n=0, max -)" in text


def test_percentile_needs_values():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([7.0], 99) == 7.0


# -- the message generator ------------------------------------------------------------------------
def test_a_seeded_generator_repeats_itself():
    def messages(seed: int) -> list[str]:
        generator = Generator(seed=seed)
        topic = generator.topic("caring_friend")
        history: list[tuple[str, str]] = []
        return [topic] + [
            run(generator.next_message(i, name="Ann", topic=topic, template_id=None, history=history)) for i in range(4)
        ]

    first = messages(7)
    assert first == messages(7) and first[0] in TOPICS["caring_friend"]
    assert "Ann" in first[1] and first[0] in first[1]
    assert Generator().description == "topic templates (no LLM configured)"


def test_a_blank_model_answer_falls_back_to_the_topic_list():
    with FakeModel("   \n ") as fake:
        generator = Generator(LlmSettings("openai", fake.base_url + "/", "sim", "", 5.0), seed=3)

        async def ask() -> str:
            try:
                return await generator.next_message(0, name="Bo", topic="tea", template_id=None, history=[])
            finally:
                await generator.aclose()

        text = run(ask())
    assert generator.llm_messages == 0 and generator.llm_failures == 1
    assert generator.last_llm_error == "LlmError: the model returned an empty reply"
    assert "Bo" in text and "tea" in text  # an opener from the topic list
    assert fake.requests[0]["messages"][-1]["content"].startswith("(the chat starts")
    assert LlmSettings("ollama", "http://x", "m").usable is False


# -- chat connection bookkeeping ------------------------------------------------------------------
def test_replies_to_other_messages_are_kept_as_stray_and_foreign_errors_ignored():
    connection = ChatConnection("ws://replier.test/ws", "mtk_x", "qq", "u", "Ann")

    def reply(message_id: str, reply_to: str | None) -> Reply:
        return Reply("hi", message_id, reply_to, {}, None, None, 0.0)

    async def scenario() -> tuple:
        await connection.replies.put({"code": "busy", "message": "not yours", "message_id": "other"})
        await connection.replies.put(reply("mt-reply:late", "late"))
        await connection.replies.put(reply("mt-reply:m1", None))  # matched by its id alone
        found = await connection.wait_reply("m1", 1.0)
        await connection.replies.put({"code": "bad_request", "message": "nope", "message_id": None})
        with pytest.raises(ChatError, match="replier error bad_request: nope"):
            await connection.wait_reply("m2", 1.0)
        await connection.replies.put(reply("mt-reply:later", "later"))
        await connection.replies.put({"code": "x"})
        stray = await connection.drain(wait=0.01)
        with pytest.raises(ChatError, match=r"no reply to m3 within 0\.05 s"):
            await connection.wait_reply("m3", 0.05)
        with pytest.raises(ChatError, match="send failed: the connection is not open"):
            await connection.send(connection.message("hello"))
        await connection.close()  # never opened: nothing to close
        return found, stray

    found, stray = run(scenario())
    assert found.message_id == "mt-reply:m1"
    assert [r.reply_to for r in stray] == ["late", "later"]
    assert connection.replies.empty()
