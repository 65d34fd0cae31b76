"""Fixtures of the replier tests: one real replier subprocess per session on the leg's database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_openai import FakeOpenAI
from replier_support import ReplierProcess


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def replier_server(provisioned, configured_db) -> Iterator[ReplierProcess]:
    server = ReplierProcess(provisioned.url, provisioned.app_role)
    server.start()
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        server = item.funcargs.get("replier_server")
        if server is not None:
            report.sections.append(("replier log", server.logs()))
