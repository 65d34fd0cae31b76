"""Refused connections and rejected messages are visible at INFO: one line each, with the reason, the
platform and a key prefix (never the key), and a client that retries in a loop cannot flood the log.

A replier of its own (the throttle is per reason and address, and every test connects from 127.0.0.1),
at LOG_LEVEL=info, so what is asserted is what an operator sees by default.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import pytest
import websockets
from replier_support import ReplierProcess, make_tenant, run, socketio_connect

from isolation import logthrottle
from replier.gate import key_hint

THROTTLE_SECONDS = 10.0  # replier.gate.REFUSAL_LOG_SECONDS
BOGUS_KEY = "mtk_" + "Zq9" * 14 + "x"


@pytest.fixture(scope="module")
def info_replier(provisioned, configured_db) -> Iterator[ReplierProcess]:
    server = ReplierProcess(provisioned.url, provisioned.app_role, LOG_LEVEL="info")
    server.start()
    yield server
    server.stop()
    if server.log_path is not None:
        server.log_path.unlink(missing_ok=True)


def _lines(server: ReplierProcess, *parts: str) -> list[str]:
    """The log lines containing every one of `parts` (the log is flushed line by line)."""
    assert server.log_path is not None
    text = server.log_path.read_text(encoding="utf-8", errors="replace")
    return [line for line in text.splitlines() if all(part in line for part in parts)]


@pytest.mark.parametrize(
    ("headers", "query", "code", "key_hint"),
    [
        ({"x-platform": "plat-missing"}, "", "missing_key", "key none"),
        ({"x-platform": "plat-invalid", "x-apikey": BOGUS_KEY}, "", "invalid_key", "key mtk_Zq9Z"),
        ({"x-platform": "plat-query"}, f"&apikey={BOGUS_KEY}", "key_in_query", "key none"),
    ],
)
def test_a_refused_connection_is_logged_once(info_replier, headers, query, code, key_hint) -> None:
    platform = headers.get("x-platform") or headers["platform"]
    refusal = run(socketio_connect(info_replier.url, headers, query))
    assert refusal is not None and refusal["message"]
    lines = _lines(info_replier, "refused connection from 127.0.0.1", f"(platform {platform},")
    assert len(lines) == 1, lines
    assert f": {code} (platform {platform}, {key_hint})" in lines[0]
    assert " INFO " in lines[0] or " WARNING " in lines[0]
    assert BOGUS_KEY not in info_replier.logs()


def test_a_key_hint_is_at_most_an_mtk_prefix() -> None:
    """Any other value presented as a key may be someone's secret elsewhere: none of it is logged."""
    assert key_hint(BOGUS_KEY) == "mtk_Zq9Z"
    assert key_hint("not-a-key-but-a-password") == "not an mtk_ key"
    assert key_hint("") == "none"


def test_a_revoked_key_is_named_by_its_id(info_replier) -> None:
    ta = make_tenant()
    ta.revoke()
    refusal = run(socketio_connect(info_replier.url, {"x-apikey": ta.secret, "x-platform": "plat-revoked"}))
    assert refusal is not None and "revoked" in refusal["message"]
    lines = _lines(info_replier, "refused connection", "(platform plat-revoked,")
    assert len(lines) == 1 and f"key id {ta.key_id})" in lines[0], lines
    assert ta.secret not in info_replier.logs() and ta.secret[:12] not in info_replier.logs()


async def _send_bad_messages(url: str, secret: str, count: int) -> list[dict]:
    """Connect with `secret`, send `count` messages that are not envelopes; the error replies."""
    headers = {"x-apikey": secret, "x-platform": "plat-rejected"}
    async with websockets.connect(f"{url}/?EIO=4&transport=websocket", additional_headers=headers) as ws:
        await ws.recv()
        await ws.send("40")
        assert str(await ws.recv()).startswith("40")
        errors = []
        for _ in range(count):
            await ws.send('42["message","not an envelope"]')
            answer = str(await ws.recv())
            while answer == "2":  # a ping
                await ws.send("3")
                answer = str(await ws.recv())
            errors.append(json.loads(answer[2:])[1])
    return errors


def test_rejected_messages_are_logged_once_per_connection_and_code(info_replier) -> None:
    ta = make_tenant()
    errors = run(_send_bad_messages(info_replier.url, ta.secret, 3))
    assert len(errors) == 3
    lines = _lines(info_replier, "rejected message on connection", f"key id {ta.key_id})")
    assert len(lines) == 1, lines  # three rejections, one line: the others are counted for the next
    assert "(platform plat-rejected," in lines[0] and "invalid_envelope" in lines[0]
    assert ta.secret not in info_replier.logs()


def test_a_burst_of_refusals_writes_a_bounded_number_of_lines(info_replier) -> None:
    headers = {"x-apikey": BOGUS_KEY, "x-platform": "plat-burst"}

    async def burst() -> list:
        return [await socketio_connect(info_replier.url, headers) for _ in range(50)]

    started = time.monotonic()
    before = len(_lines(info_replier, "refused connection from 127.0.0.1: invalid_key"))
    refusals = run(burst())
    elapsed = time.monotonic() - started
    assert all(r is not None for r in refusals)
    written = len(_lines(info_replier, "refused connection from 127.0.0.1: invalid_key")) - before
    # At most one line per throttle interval (plus the one that opens it), however many refusals.
    assert written <= 1 + int(elapsed // THROTTLE_SECONDS) + 1, written


def test_the_throttle_says_how_many_it_suppressed(monkeypatch, caplog) -> None:
    """The line after a quiet interval carries the count, so throttling hides no volume."""
    clock = [1000.0]
    monkeypatch.setattr(logthrottle.time, "monotonic", lambda: clock[0])
    throttled = logthrottle.ThrottledLog(logging.getLogger("throttle-test"), 10.0)
    with caplog.at_level(logging.INFO, logger="throttle-test"):
        assert throttled.log("invalid_key", "10.0.0.1", "refused %s", "a") is True
        assert [throttled.log("invalid_key", "10.0.0.1", "refused %s", "b") for _ in range(4)] == [False] * 4
        assert throttled.log("invalid_key", "10.0.0.2", "refused %s", "c") is True  # another address
        clock[0] += 10.0
        assert throttled.log("invalid_key", "10.0.0.1", "refused %s", "d") is True
    assert [r.getMessage() for r in caplog.records] == [
        "refused a",
        "refused c",
        "refused d (4 more suppressed in the last 10 s)",
    ]
