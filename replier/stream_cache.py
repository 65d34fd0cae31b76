"""What the replier remembers between two messages of a stream, so most messages cost one small job.

Per agent: its settings (re-checked against the database version every `agent_cache_seconds`). Per
stream: that it exists (touched every `TOUCH_SECONDS`), its recent history and its memories (read again
at least every `context_cache_seconds`, and whenever the agent changes). All of it is safe to lose:
`plan` asks the ingest job for whatever is missing or stale, `absorb` keeps what the job read.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from isolation.context import IsolationContext
from replier.connections import StreamKey
from replier.core.config import ReplierSettings
from replier.db_jobs import AgentView, AnswerOffline, IngestRequest, IngestResult
from replier.llm.base import LlmDefaults
from replier.protocol import Inbound
from replier.reply import Reply

MAX_KNOWN_STREAMS = 200_000
MAX_CACHED_STREAMS = 50_000
TOUCH_SECONDS = 30.0


@dataclass(slots=True)
class Plan:
    """The ingest job to run for one message, and the cached context it was planned with."""

    request: IngestRequest
    now: float
    history: tuple[deque, float] | None
    memories: tuple[list, float] | None


class StreamCache:
    def __init__(self, settings: ReplierSettings) -> None:
        self.settings = settings
        self._agents: dict[tuple[str, str], tuple[AgentView, float]] = {}
        self._known_streams: OrderedDict[StreamKey, float] = OrderedDict()
        self._history: dict[StreamKey, tuple[deque, float]] = {}
        self._memories: dict[StreamKey, tuple[list, float]] = {}

    @property
    def known_streams(self) -> int:
        return len(self._known_streams)

    @property
    def cached_streams(self) -> int:
        """How many streams' history or memories are cached (the larger of the two)."""
        return max(len(self._history), len(self._memories))

    def plan(
        self,
        key: StreamKey,
        ctx: IsolationContext,
        inbound: Inbound,
        defaults: LlmDefaults,
        stored_id: str | None = None,
    ) -> Plan:
        """The ingest request for `inbound`: it answers offline in the job when the cached agent has no model.
        `stored_id`: the message is stored already under that id (only answer it)."""
        tenant_id, agent_id, _, _ = key
        now = time.monotonic()
        cached = self._agents.get((tenant_id, agent_id))
        last_touch = self._known_streams.get(key)
        known = last_touch is not None
        ttl = self.settings.context_cache_seconds
        history = self._history.get(key)
        memories = self._memories.get(key)
        agent = cached[0] if cached else None
        offline = None
        if agent is not None and defaults.resolve(agent.llm, agent.llm_api_key).kind == "offline":
            offline = AnswerOffline(defaults, list(memories[0]) if memories is not None else [])
        request = IngestRequest(
            ctx,
            inbound,
            stream_known=known,
            cached_agent=agent,
            check_agent=cached is None or now - cached[1] >= self.settings.agent_cache_seconds,
            touch=known and now - last_touch >= TOUCH_SECONDS,
            need_history=history is None or now - history[1] >= ttl,
            need_memories=memories is None or now - memories[1] >= ttl,
            offline=offline,
            replay_window=self.settings.dedup_ttl_seconds,
            stored_id=stored_id,
        )
        return Plan(request, now, history, memories)

    def forget_agent(self, tenant_id: str, agent_id: str | None = None) -> None:
        """An agent (None: every agent of the tenant) changed elsewhere: read its settings, and its
        streams' history and memories, from the database at its next message."""

        def mine(key: tuple) -> bool:
            return key[0] == tenant_id and (agent_id is None or key[1] == agent_id)

        for cache in (self._agents, self._history, self._memories, self._known_streams):
            for key in [k for k in cache if mine(k)]:
                del cache[key]

    def forget_context(self, key: StreamKey) -> None:
        """Another replier answered in this stream last: read its history and memories again."""
        self._history.pop(key, None)
        self._memories.pop(key, None)

    def forget_stream(self, key: StreamKey) -> None:
        """The stream may have been deleted (history cleanup): the next job creates it again."""
        self._known_streams.pop(key, None)

    def absorb(self, key: StreamKey, plan: Plan, result: IngestResult) -> None:
        """Keep what the job `plan.request` read; fill in `result` what it did not read from the cache."""
        request, now = plan.request, plan.now
        if request.check_agent or result.agent_reloaded:
            self._agents[(key[0], key[1])] = (result.agent, now)
        limit = result.agent.config.chat.max_context_size
        if len(self._history) > MAX_CACHED_STREAMS or len(self._memories) > MAX_CACHED_STREAMS:
            self._history.clear()
            self._memories.clear()
        if result.history is not None:
            self._history[key] = (deque(result.history, maxlen=max(limit, 1)), now)
        elif plan.history is not None:
            result.history = list(plan.history[0])[-limit:] if limit else []
        if result.memories is not None:
            self._memories[key] = (list(result.memories), now)
        elif plan.memories is not None:
            result.memories = list(plan.memories[0])
        if not request.stream_known or request.touch:
            self._known_streams[key] = now
            self._known_streams.move_to_end(key)
            if len(self._known_streams) > MAX_KNOWN_STREAMS:
                self._known_streams.popitem(last=False)

    def remember(self, key: StreamKey, inbound: Inbound, reply: Reply) -> None:
        """Add the stored exchange to the stream's cached history (and its new memory)."""
        cached = self._history.get(key)
        if cached is not None:
            cached[0].append(("in", inbound.text, reply.user_name))
            cached[0].append(("out", reply.text, reply.agent_name))
        if reply.memory:
            memories = self._memories.get(key)
            if memories is not None:
                memories[0].append(reply.memory)
                del memories[0][: -reply.max_memories]
