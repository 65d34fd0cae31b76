"""What the agents' chats leave behind: chat streams, messages, memories and LLM usage rows.

Messages and usage rows are written by `sql.insert_message` / `sql.insert_usage`, the same functions
the replier's `isolation.fastpath.ChatSession` uses: one write path, whoever calls it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from isolation.context import IsolationContext, Level
from isolation.ids import chat_stream_id, new_id, utcnow
from isolation.managers import sql
from isolation.managers.base import TableManager, page_size, parent_must_exist
from isolation.models import ChatStream, LlmUsage, Memory, Message


class ChatStreamManager(TableManager):
    model = ChatStream
    entity = "chat stream"
    scope_columns = {"agent_id": "agent_id", "platform": "platform", "chat_stream_id": "id"}

    def stream_id_for(self, kind: str, peer_id: str) -> str:
        """The id of this context's stream with a group or a user (no database access)."""
        self.ctx.require(Level.TAP)
        return chat_stream_id(self.ctx.tenant_id, self.ctx.agent_id, self.ctx.platform, kind, peer_id)

    def get_or_create(
        self,
        *,
        group_id: str | None = None,
        user_id: str | None = None,
        group_name: str | None = None,
    ) -> dict:
        """The stream of a group (when `group_id`) or a private chat with `user_id`; created once."""
        self.ctx.require(Level.TAP)
        if group_id:
            kind, peer = "group", group_id
        elif user_id:
            kind, peer = "private", user_id
        else:
            raise ValueError("a chat stream needs a group_id or a user_id")
        stream_id = self.stream_id_for(kind, peer)
        now = utcnow()
        with parent_must_exist("agent"), self._writing():
            self._insert(
                id=stream_id,
                agent_id=self.ctx.agent_id,
                platform=self.ctx.platform,
                kind=kind,
                group_id=group_id if kind == "group" else None,
                user_id=user_id if kind == "private" else None,
                group_name=group_name,
                created_at=now,
                last_active_at=now,
            ).on_conflict_ignore().execute()
            return self._get(ChatStream.id == stream_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(ChatStream.last_active_at.desc(), ChatStream.id)
            return list(query.limit(page_size(limit)).offset(offset))

    def touch(self, stream_id: str, when: datetime | None = None) -> None:
        with self._writing():
            ChatStream.update(last_active_at=when or utcnow()).where(
                self._scope() & (ChatStream.id == stream_id)
            ).execute()

    def context_for(self, stream_id: str) -> IsolationContext:
        """The T+A+C+P context of one of this context's streams (NotFound for foreign ids)."""
        row = self.get(stream_id)
        return IsolationContext(self.ctx.tenant_id, row["agent_id"], row["platform"], row["id"])


def _chat_scope(ctx: IsolationContext) -> sql.Scope:
    return ctx.tenant_id, ctx.agent_id, ctx.platform, ctx.chat_stream_id


class MessageManager(TableManager):
    model = Message
    entity = "message"

    def add(self, **fields: Any) -> tuple[dict, bool]:
        """Store a message of this chat stream; returns (row, created). Replays return the stored row.

        Fields (keyword arguments) as `sql.insert_message`: message_id, direction ("in"|"out"), text,
        segments, and optionally sender_user_id, sender_nickname, reply_to, created_at.
        """
        self.ctx.require(Level.TACP)
        with parent_must_exist("chat stream"), self._writing():
            _row_id, created = sql.insert_message(_chat_scope(self.ctx), fields)
            row = self._get(Message.message_id == fields["message_id"])
        return row, created

    def history(self, limit: int = 20, before: datetime | None = None) -> list[dict]:
        """The last `limit` messages of this chat stream, oldest first."""
        self.ctx.require(Level.TACP)
        with self._reading():
            query = self._select()
            if before is not None:
                query = query.where(Message.created_at < before)
            rows = list(query.order_by(Message.created_at.desc(), Message.id.desc()).limit(page_size(limit)))
        rows.reverse()
        return rows

    def page(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Messages of this chat stream, newest first, for paginated listings."""
        self.ctx.require(Level.TACP)
        with self._reading():
            query = self._select().order_by(Message.created_at.desc(), Message.id.desc())
            return list(query.limit(page_size(limit)).offset(offset))

    def by_message_id(self, message_id: str) -> dict:
        self.ctx.require(Level.TACP)
        return self._get(Message.message_id == message_id)


_MEMORY_LEVELS = {"agent": Level.TA, "platform": Level.TAP, "chat": Level.TACP}
_DEFAULT_MEMORY_LEVEL = {Level.TA: "agent", Level.TAP: "platform", Level.TACP: "chat"}


class MemoryManager(TableManager):
    model = Memory
    entity = "memory"

    def add(self, content: str, *, level: str | None = None, source: str = "api") -> dict:
        """Store a memory at `level` (default: the narrowest the context allows)."""
        level = level or _DEFAULT_MEMORY_LEVEL.get(self.ctx.level, "agent")
        need = _MEMORY_LEVELS.get(level)
        if need is None:
            raise ValueError("level must be agent, platform or chat")
        self.ctx.require(need)
        row_id = new_id("mem")
        with parent_must_exist("agent or chat stream"), self._writing():
            self._insert(
                id=row_id,
                agent_id=self.ctx.agent_id,
                level=level,
                platform=self.ctx.platform if level in ("platform", "chat") else None,
                chat_stream_id=self.ctx.chat_stream_id if level == "chat" else None,
                content=content,
                source=source,
                created_at=utcnow(),
            ).execute()
        return self.get(row_id)

    def _scope(self):
        clause = Memory.tenant_id == self.ctx.tenant_id
        if self.ctx.agent_id is not None:
            clause &= Memory.agent_id == self.ctx.agent_id
        # A platform or chat context sees the agent-wide memories plus its own platform/chat ones.
        if self.ctx.platform is not None:
            clause &= Memory.platform.is_null() | (Memory.platform == self.ctx.platform)
        if self.ctx.chat_stream_id is not None:
            clause &= Memory.chat_stream_id.is_null() | (Memory.chat_stream_id == self.ctx.chat_stream_id)
        return clause

    def list(self, level: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select()
            if level is not None:
                query = query.where(Memory.level == level)
            return list(query.order_by(Memory.created_at.desc(), Memory.id).limit(page_size(limit)).offset(offset))

    def relevant(self, limit: int = 20) -> list[dict]:
        """Memories for a reply in this chat: agent-wide, this platform's and this chat's, newest first."""
        self.ctx.require(Level.TACP)
        return self.list(limit=limit)

    def update(self, memory_id: str, content: str) -> dict:
        return self._update(memory_id, {Memory.content: content})

    def delete_all(self) -> int:
        """Delete every memory the context sees (e.g. all of one agent's)."""
        with self._writing():
            return Memory.delete().where(self._scope()).execute()


class LlmUsageManager(TableManager):
    model = LlmUsage
    entity = "llm usage"

    def record(self, **fields: Any) -> dict:
        """One usage row of the context's agent and platform (and chat stream, when it names one).

        Fields (keyword arguments) as `sql.insert_usage`: provider, model, outcome, and optionally
        prompt_tokens, completion_tokens, latency_ms, error.
        """
        self.ctx.require(Level.TAP)
        with parent_must_exist("agent or chat stream"), self._writing():
            row_id = sql.insert_usage(_chat_scope(self.ctx), fields)
        return self.get(row_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(LlmUsage.created_at.desc(), LlmUsage.id)
            return list(query.limit(page_size(limit)).offset(offset))
