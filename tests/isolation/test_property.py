"""Property-based isolation: random interleaved operations, checked against an in-memory model.

Each example builds 3 tenants x 2 agents and runs a random sequence of writes, reads, updates and
deletes over 2 platforms x 3 chats, with contexts at every level (T, T+A, T+A+P, T+A+C+P). Every
answer must equal what a simple dict-based model says the context may see; ids of other tenants
must raise NotFound and change nothing. Examples accumulate in the same database, so each one also
runs beside all earlier examples' tenants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isolation import Conflict, InvalidValueError, IsolationContext, NotFound, Scoped
from tests.isolation.conftest import build_world

EXAMPLES = int(os.environ.get("MAITENANT_HYPOTHESIS_EXAMPLES", "200"))
PLATFORMS = ("qq", "web")
CHATS = (("group", "g1"), ("group", "g2"), ("private", "u1"))
EXAMPLES_RUN = {"count": 0, "operations": 0}

T = st.integers(0, 2)
A = st.integers(0, 1)
P = st.integers(0, 1)
C = st.integers(0, 2)
OPT_A = st.none() | A
OPT_P = st.none() | P
OPT_C = st.none() | C
TEXT = st.text(min_size=1, max_size=12)

OPERATIONS = st.one_of(
    st.tuples(st.just("message"), T, A, P, C, st.integers(0, 4), TEXT),
    st.tuples(st.just("history"), T, A, P, C, st.integers(1, 6)),
    st.tuples(st.just("memory_add"), T, A, P, C, st.sampled_from(["agent", "platform", "chat"]), TEXT),
    st.tuples(st.just("memory_list"), T, OPT_A, OPT_P, OPT_C),
    st.tuples(st.just("memory_delete"), T, st.integers(0, 50)),
    st.tuples(st.just("memory_update"), T, st.integers(0, 50), TEXT),
    st.tuples(st.just("agent_rename"), T, T, A, st.sampled_from(["x", "y", "z"])),
    st.tuples(st.just("count_messages"), T, OPT_A),
    st.tuples(st.just("usage"), T, A, P, C),
    st.tuples(st.just("usage_count"), T, OPT_A),
    st.tuples(st.just("streams"), T, OPT_A, OPT_P),
    st.tuples(st.just("message_delete"), T, st.integers(0, 50)),
)


@dataclass
class Model:
    """What each tenant owns, by model indices (t, a, p, c)."""

    messages: dict[tuple, list[str]] = field(default_factory=dict)  # stream -> message ids in order
    message_rows: list[tuple[tuple, str, str]] = field(default_factory=list)  # (stream, row id, message id)
    memories: list[tuple[str, int, int, str, int | None, int | None, str]] = field(default_factory=list)
    agent_names: dict[tuple[int, int], str] = field(default_factory=dict)
    usage: list[tuple[int, int, int, int]] = field(default_factory=list)

    def visible_memory(self, memory, t, a, p, c) -> bool:
        _id, mt, ma, _level, mp, mc, _content = memory
        if mt != t or (a is not None and ma != a):
            return False
        if p is not None and mp is not None and mp != p:
            return False
        return not (c is not None and mc is not None and (mp, mc) != (p, c))


class Runner:
    def __init__(self) -> None:
        self.world = build_world(tenants=3, agents=2)
        self.model = Model()
        self.clock = datetime(2026, 1, 1)
        for t in range(len(self.world.tenants)):
            for a in range(2):
                self.model.agent_names[(t, a)] = f"agent{a}"
        self.stream_ids: dict[tuple, str] = {}

    def tenant(self, t: int) -> str:
        return self.world.tenants[t]

    def agent(self, t: int, a: int) -> str:
        return self.world.agents[self.tenant(t)][a]

    def ctx(self, t, a=None, p=None, c=None) -> IsolationContext:
        ctx = IsolationContext(self.tenant(t))
        if a is not None:
            ctx = ctx.child(agent_id=self.agent(t, a))
        if a is not None and p is not None:
            ctx = ctx.child(platform=PLATFORMS[p])
            if c is not None:
                ctx = ctx.child(chat_stream_id=self.stream(t, a, p, c))
        return ctx

    def stream(self, t, a, p, c) -> str:
        key = (t, a, p, c)
        if key not in self.stream_ids:
            kind, peer = CHATS[c]
            scoped = Scoped(self.ctx(t, a, p))
            ids = {"group_id": peer} if kind == "group" else {"user_id": peer}
            self.stream_ids[key] = scoped.chat_streams.get_or_create(**ids)["id"]
        return self.stream_ids[key]

    def run(self, op: tuple) -> None:
        getattr(self, "op_" + op[0])(*op[1:])

    # -- operations --------------------------------------------------------------------------
    def op_message(self, t, a, p, c, mid, text):
        key = (t, a, p, c)
        message_id = f"m{mid}"
        self.clock += timedelta(milliseconds=1)
        if "\x00" in text:  # refused on every database alike, before anything is written
            before = Scoped(self.ctx(t, a, p, c)).messages.count()
            with pytest.raises(InvalidValueError):
                Scoped(self.ctx(t, a, p, c)).messages.add(message_id=message_id, direction="in", text=text, segments=[])
            assert Scoped(self.ctx(t, a, p, c)).messages.count() == before
            return
        row, created = Scoped(self.ctx(t, a, p, c)).messages.add(
            message_id=message_id,
            direction="in",
            text=text,
            segments=[{"type": "text", "data": text}],
            created_at=self.clock,
        )
        stored = self.model.messages.setdefault(key, [])
        assert created == (message_id not in stored)
        if created:
            stored.append(message_id)
            self.model.message_rows.append((key, row["id"], message_id))
        assert (row["tenant_id"], row["agent_id"], row["platform"]) == (self.tenant(t), self.agent(t, a), PLATFORMS[p])

    def op_history(self, t, a, p, c, limit):
        rows = Scoped(self.ctx(t, a, p, c)).messages.history(limit)
        expected = self.model.messages.get((t, a, p, c), [])[-limit:]
        assert [r["message_id"] for r in rows] == expected
        assert {r["chat_stream_id"] for r in rows} <= {self.stream(t, a, p, c)}

    def op_memory_add(self, t, a, p, c, level, content):
        ctx = self.ctx(t, a, p, c)
        if "\x00" in content:
            with pytest.raises(InvalidValueError):
                Scoped(ctx).memories.add(content, level=level, source="property")
            return
        row = Scoped(ctx).memories.add(content, level=level, source="property")
        mp = p if level in ("platform", "chat") else None
        mc = c if level == "chat" else None
        self.model.memories.append((row["id"], t, a, level, mp, mc, content))

    def op_memory_list(self, t, a, p, c):
        if a is None:
            p = None
        if p is None:
            c = None
        rows = Scoped(self.ctx(t, a, p, c)).memories.list(limit=500)
        expected = {m[0]: m[6] for m in self.model.memories if self.model.visible_memory(m, t, a, p, c)}
        assert {r["id"]: r["content"] for r in rows} == expected

    def _pick_memory(self, index):
        return self.model.memories[index % len(self.model.memories)] if self.model.memories else None

    def op_memory_delete(self, t, index):
        memory = self._pick_memory(index)
        if memory is None:
            return
        scoped = Scoped(IsolationContext(self.tenant(t)))
        if memory[1] != t:
            try:
                scoped.memories.delete(memory[0])
            except NotFound:
                return
            raise AssertionError("deleted another tenant's memory")
        scoped.memories.delete(memory[0])
        self.model.memories.remove(memory)

    def op_memory_update(self, t, index, content):
        memory = self._pick_memory(index)
        if memory is None:
            return
        scoped = Scoped(IsolationContext(self.tenant(t)))
        if "\x00" in content:  # validation comes first and says nothing about whose row it is
            with pytest.raises(InvalidValueError):
                scoped.memories.update(memory[0], content)
            owner = Scoped(IsolationContext(self.tenant(memory[1])))
            assert owner.memories.get(memory[0])["content"] == memory[6]
            return
        if memory[1] != t:
            try:
                scoped.memories.update(memory[0], content)
            except NotFound:
                return
            raise AssertionError("updated another tenant's memory")
        assert scoped.memories.update(memory[0], content)["content"] == content
        i = self.model.memories.index(memory)
        self.model.memories[i] = (*memory[:6], content)

    def op_agent_rename(self, t_caller, t_owner, a, name):
        scoped = Scoped(IsolationContext(self.tenant(t_caller)))
        agent_id = self.agent(t_owner, a)
        if t_caller != t_owner:
            try:
                scoped.agents.update(agent_id, name=name)
            except NotFound:
                return
            raise AssertionError("renamed another tenant's agent")
        taken = {n for (t, other), n in self.model.agent_names.items() if t == t_owner and other != a}
        if name in taken:
            try:
                scoped.agents.update(agent_id, name=name)
            except Conflict:
                return
            raise AssertionError("duplicate agent name accepted")
        assert scoped.agents.update(agent_id, name=name)["name"] == name
        self.model.agent_names[(t_owner, a)] = name
        names = {r["id"]: r["name"] for r in scoped.agents.list()}
        assert names == {self.agent(t_owner, i): self.model.agent_names[(t_owner, i)] for i in range(2)}

    def op_count_messages(self, t, a):
        count = Scoped(self.ctx(t, a)).messages.count()
        expected = sum(len(v) for (mt, ma, _p, _c), v in self.model.messages.items() if mt == t and a in (None, ma))
        assert count == expected

    def op_usage(self, t, a, p, c):
        Scoped(self.ctx(t, a, p, c)).llm_usage.record(provider="offline", model="offline", outcome="offline")
        self.model.usage.append((t, a, p, c))

    def op_usage_count(self, t, a):
        expected = sum(1 for (ut, ua, _p, _c) in self.model.usage if ut == t and a in (None, ua))
        assert Scoped(self.ctx(t, a)).llm_usage.count() == expected
        assert Scoped(IsolationContext(self.tenant(t))).tenant.stats()["llm_calls"] == sum(
            1 for u in self.model.usage if u[0] == t
        )

    def op_streams(self, t, a, p):
        if a is None:
            p = None
        rows = Scoped(self.ctx(t, a, p)).chat_streams.list(limit=500)
        expected = {
            sid
            for (st_, sa, sp, _c), sid in self.stream_ids.items()
            if st_ == t and a in (None, sa) and p in (None, sp)
        }
        assert {r["id"] for r in rows} == expected

    def op_message_delete(self, t, index):
        if not self.model.message_rows:
            return
        key, row_id, message_id = self.model.message_rows[index % len(self.model.message_rows)]
        scoped = Scoped(IsolationContext(self.tenant(t)))
        if key[0] != t:
            try:
                scoped.messages.delete(row_id)
            except NotFound:
                return
            raise AssertionError("deleted another tenant's message")
        scoped.messages.delete(row_id)
        self.model.message_rows.remove((key, row_id, message_id))
        self.model.messages[key].remove(message_id)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(operations=st.lists(OPERATIONS, min_size=8, max_size=40))
def test_every_operation_sees_and_changes_only_its_context(db, operations):
    runner = Runner()
    for op in operations:
        runner.run(op)
    EXAMPLES_RUN["count"] += 1
    EXAMPLES_RUN["operations"] += len(operations)


def test_property_examples_ran(db):
    """Runs after the property test (file order) and reports how many examples really ran."""
    if EXAMPLES_RUN["count"] == 0:
        return  # the property test was deselected
    print(f"\nproperty test: {EXAMPLES_RUN['count']} examples, {EXAMPLES_RUN['operations']} operations")
    assert EXAMPLES_RUN["count"] >= min(EXAMPLES, 200)
