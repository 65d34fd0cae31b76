"""The CLI's failure paths that are about real servers: what the backends refuse, what is unreachable or
unhealthy, an interrupted run, a run without database access. Every run here must leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading

import pytest

from integration_tests.api import ApiError, ConfiguratorClient
from integration_tests.cli import _execute, _quiet_cancelled
from integration_tests.runner import Run, RunOptions, new_run_prefix
from integration_tests.test_end_to_end import PASSWORD, in_thread, run, run_cli
from testsupport.databases import table_counts
from testsupport.servers import ThreadedServer


def options(servers, **overrides) -> RunOptions:
    settings = {
        "users": 1,
        "agents": 1,
        "messages": 1,
        "configurator_url": servers.configurator_url,
        "replier_url": servers.replier_url,
        "database_url": servers.database.url,
        "database_app_role": servers.database.app_role,
        "timeout": 20.0,
        "use_llm": False,
        **overrides,
    }
    return RunOptions(**settings)


def execute(run_: Run) -> dict:
    return in_thread(asyncio.run, _execute(run_))


class Unhealthy:
    """TEST DOUBLE: an HTTP server on a free port that answers every GET with 503 and a plain-text body."""

    def __enter__(self) -> str:
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def down(request) -> PlainTextResponse:
            return PlainTextResponse("down for maintenance", status_code=503)

        self.server = ThreadedServer(Starlette(routes=[Route("/{path:path}", down)]), name="unhealthy")
        self.server.start()
        return f"http://127.0.0.1:{self.server.port}"

    def __exit__(self, *exc) -> None:
        self.server.stop()


def test_an_unhealthy_configurator_fails_before_anything_is_created(servers, tmp_path):
    report_path = tmp_path / "report.json"
    with Unhealthy() as url:
        args = [*servers.cli_args(), "--configurator-url", url, "--report", str(report_path)]
        code, output = run_cli(args)
    report = json.loads(report_path.read_text())
    assert code == 1 and "FAILED" in output
    assert report["errors"] == ["ApiError: GET /health -> 503: down for maintenance"]
    assert report["created"]["accounts"] == [] and "setup" not in report["phase_s"]


def test_an_unhealthy_replier_fails_before_anything_is_created(servers, tmp_path):
    report_path = tmp_path / "report.json"
    before = table_counts(servers.database)
    with Unhealthy() as url:
        code, _ = run_cli([*servers.cli_args(), "--replier-url", url, "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 1
    assert report["errors"] == [f"RuntimeError: replier at {url}/health is not healthy: HTTP 503"]
    assert report["parameters"]["replier_url"] == url.replace("http://", "ws://") + "/ws"
    assert report["created"]["accounts"] == [] and table_counts(servers.database) == before


def test_a_password_the_configurator_refuses_creates_nothing(servers, tmp_path):
    report_path = tmp_path / "report.json"
    before = table_counts(servers.database)
    code, output = run_cli([*servers.cli_args(), "--users", "2", "--password", "pw-7x", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 1 and "no account could be registered" in output
    register_errors = [e for e in report["errors"] if e.startswith("register: POST /auth/register -> 422")]
    assert len(register_errors) == 2
    assert report["errors"][-1].startswith("RuntimeError: no account could be registered: register: POST")
    assert report["created"] == {"accounts": [], "agents": [], "api_keys": []} and report["conversations"] == []
    assert report["cleanup"]["complete"] is True and table_counts(servers.database) == before
    assert "pw-7x" not in report_path.read_text()  # the refused password is not echoed into the report


def test_a_taken_username_fails_that_user_only(servers):
    """Another account already has the run's second user name: the rest of the run goes on."""
    prefix = new_run_prefix()
    before = table_counts(servers.database)

    async def squat() -> None:
        async with ConfiguratorClient(servers.configurator_url) as api:
            await api.register(f"{prefix}u1", f"squatter-{secrets.token_hex(3)}@example.com", PASSWORD)

    run(squat())
    report = execute(Run(options(servers, users=2, messages=2, prefix=prefix)))
    assert report["ok"] is False
    assert [e.split(":")[0] for e in report["errors"]] == ["register"]
    assert "POST /auth/register -> 409" in report["errors"][0]
    assert [a["username"] for a in report["created"]["accounts"]] == [f"{prefix}u0"]
    (conversation,) = report["conversations"]
    assert conversation["ok"] is True and conversation["received"] == 2
    assert report["totals"]["conversations"] == 2 and report["totals"]["conversations_ok"] == 1
    assert report["totals"]["success_rate"] == 0.5
    # the prefix cleanup removes the squatter too: its name starts with the run's prefix
    assert report["cleanup"]["complete"] is True and report["cleanup"]["deleted"]["accounts"] == 2
    assert table_counts(servers.database) == before


def test_a_refused_api_key_fails_only_its_conversation(servers):
    """The key of one agent is revoked between setup and connecting: that chat cannot open."""
    before = table_counts(servers.database)
    r = Run(options(servers, agents=2, messages=2))
    real_setup = r.setup

    async def setup_then_revoke() -> None:
        await real_setup()
        victim = r.conversations[0]
        await r.api.request("POST", f"/api-keys/{victim.key_id}/revoke", account=victim.account)

    r.setup = setup_then_revoke
    report = execute(r)
    refused, fine = report["conversations"]
    assert refused["ok"] is False and refused["sent"] == 0
    assert len(refused["errors"]) == 1 and refused["errors"][0].startswith("cannot connect to ws://")
    assert refused["history"] == {"ok": True, "count": 0, "problems": []}  # nothing was stored for it
    assert fine["ok"] is True and fine["received"] == 2
    (stats,) = report["tenant_stats"]
    assert stats["mismatches"] == {"active_api_keys": {"expected": 2, "got": 1}}
    assert report["ok"] is False and report["cleanup"]["complete"] is True
    assert "mtk_" not in json.dumps(report)
    assert table_counts(servers.database) == before


def test_an_expired_access_token_is_renewed_once(servers):
    async def scenario() -> tuple[dict, str, int]:
        async with ConfiguratorClient(servers.configurator_url) as api:
            name = f"{new_run_prefix()}token"
            account = await api.register(name, f"{name}@example.com", PASSWORD)
            try:
                account.access_token = "not-a-valid-token"
                stats = await api.stats(account)  # 401: logs in again and retries once
                renewed = account.access_token
                account.access_token = "not-a-valid-token"
                with pytest.raises(ApiError) as refused:  # without relogin the 401 is the caller's
                    await api.request("GET", "/tenant", account=account, relogin=False)
                account.access_token = renewed
                return stats, renewed, refused.value.status
            finally:
                await api.delete_account(account)

    stats, renewed, status = run(scenario())
    assert stats["members"] == 1 and stats["agents"] == 0
    assert renewed != "not-a-valid-token" and status == 401


def test_an_interrupted_run_stops_chatting_but_cleans_up(servers):
    """Cancelled (Ctrl-C) in the middle of a conversation: no verification, cleanup, a report."""
    before = table_counts(servers.database)
    r = Run(options(servers, messages=3))
    talking = threading.Event()
    real_next = r.generator.next_message

    async def hang_at_second_message(index: int, **kwargs) -> str:
        if index == 1:
            talking.set()
            await asyncio.Event().wait()  # until cancelled
        return await real_next(index, **kwargs)

    r.generator.next_message = hang_at_second_message

    async def interrupt() -> dict:
        asyncio.get_running_loop().set_exception_handler(_quiet_cancelled)
        task = asyncio.create_task(r.execute())
        while not talking.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        return await task

    report = in_thread(asyncio.run, interrupt())
    assert r.interrupted is True and report["errors"] == ["interrupted"] and report["ok"] is False
    assert "verify" not in report["phase_s"] and "conversations" not in report["phase_s"]
    (conversation,) = report["conversations"]
    assert conversation["sent"] == 1 and conversation["received"] == 1
    assert report["cleanup"]["complete"] is True and report["cleanup"]["deleted"]["messages"] == 2
    assert table_counts(servers.database) == before


def test_cleanup_over_http_alone_is_exact(servers, tmp_path):
    """Without database access the run deletes its accounts and tenants through DELETE /auth/me."""
    before = table_counts(servers.database)
    report_path = tmp_path / "report.json"
    args = [a for a in servers.cli_args() if a != "--no-progress"]
    cut = args.index("--database-url")
    args = args[:cut] + args[cut + 2 :]
    if "--database-app-role" in args:
        cut = args.index("--database-app-role")
        args = args[:cut] + args[cut + 2 :]
    args += ["--users", "2", "--agents", "1", "--messages", "1", "--password", PASSWORD]
    code, output = run_cli([*args, "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 0, output
    cleanup = report["cleanup"]
    assert cleanup["mode"] == "http" and cleanup["complete"] is True and cleanup["deleted"]["accounts"] == 2
    assert cleanup["login_status_after"] == {"401": 2} and cleanup["accounts_left"] == 0 and "note" not in cleanup
    # the progress bar was shown (no --no-progress): its phases are in the output
    assert "register users, agents, keys" in output and "conversations (messages answered)" in output
    assert table_counts(servers.database) == before
    usernames = [a["username"] for a in report["created"]["accounts"]]

    async def logins() -> list[int]:
        async with ConfiguratorClient(servers.configurator_url) as api:
            return [await api.login_status(name, PASSWORD) for name in usernames]

    assert run(logins()) == [401, 401]
