"""IsolationContext: validation, levels, narrowing and the per-task current context."""

from __future__ import annotations

import asyncio

import pytest

from isolation import IsolationContext, IsolationViolationError, Level, current_context, use_context
from isolation.context import current_context_or_none
from isolation.errors import InvalidContextError


@pytest.mark.parametrize(
    ("kwargs", "level"),
    [
        ({"tenant_id": "ten_a"}, Level.T),
        ({"tenant_id": "ten_a", "agent_id": "agt_a"}, Level.TA),
        ({"tenant_id": "ten_a", "agent_id": "agt_a", "platform": "qq"}, Level.TAP),
        ({"tenant_id": "ten_a", "agent_id": "agt_a", "platform": "qq", "chat_stream_id": "cs_1"}, Level.TACP),
    ],
)
def test_level_follows_the_ids_given(kwargs, level):
    assert IsolationContext(**kwargs).level is level


@pytest.mark.parametrize("bad", ["", " ", "%", "ten a", "a" * 129, "ten_'; drop", None, 5])
def test_blank_or_wildcard_tenant_ids_are_refused(bad):
    with pytest.raises(InvalidContextError):
        IsolationContext(bad)


def test_chat_without_platform_and_platform_without_agent_are_refused():
    with pytest.raises(InvalidContextError):
        IsolationContext("ten_a", "agt_a", chat_stream_id="cs_1")
    with pytest.raises(InvalidContextError):
        IsolationContext("ten_a", platform="qq")


def test_context_is_frozen():
    ctx = IsolationContext("ten_a")
    with pytest.raises(AttributeError):
        ctx.tenant_id = "ten_b"  # type: ignore[misc]


def test_child_narrows_but_never_changes_a_set_value():
    ctx = IsolationContext("ten_a").child(agent_id="agt_a").child(platform="qq", chat_stream_id="cs_1")
    assert ctx == IsolationContext("ten_a", "agt_a", "qq", "cs_1")
    assert ctx.child(agent_id="agt_a") == ctx
    with pytest.raises(IsolationViolationError):
        ctx.child(agent_id="agt_other")


def test_require_raises_below_the_needed_level():
    IsolationContext("ten_a", "agt_a", "qq").require(Level.TA)
    with pytest.raises(IsolationViolationError):
        IsolationContext("ten_a").require(Level.TACP)


def test_no_current_context_is_an_error_not_a_wildcard():
    assert current_context_or_none() is None
    with pytest.raises(IsolationViolationError):
        current_context()


def test_current_context_is_per_asyncio_task():
    seen: dict[str, str] = {}

    async def worker(tenant: str) -> None:
        with use_context(IsolationContext(tenant)):
            await asyncio.sleep(0.01)  # let the other task run while this one holds its context
            seen[tenant] = current_context().tenant_id

    async def main() -> None:
        await asyncio.gather(worker("ten_a"), worker("ten_b"))

    asyncio.run(main())
    assert seen == {"ten_a": "ten_a", "ten_b": "ten_b"}
    assert current_context_or_none() is None
