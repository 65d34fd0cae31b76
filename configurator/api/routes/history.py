"""Chat history and memories of an agent, and wiping an agent's history."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from configurator.api.deps import ADMIN, AgentId, CurrentPrincipal, MemoryId, PageDep, StreamId, TenantSession
from configurator.core.errors import ApiError, responses
from configurator.schemas import (
    ChatStreamOut,
    DeletedCount,
    DeletedCounts,
    MemoryCreate,
    MemoryOut,
    MessageOut,
    Page,
)
from isolation import IsolationContext, Scoped
from isolation.cleanup import delete_agent_history

router = APIRouter(tags=["history and memory"])
_ADD_ERRORS = responses(401, 403, 404, 413, 422)  # POST /agents/{agent_id}/memories


def _agent_scope(session: TenantSession, agent_id: str) -> Scoped:
    """The T+A scope of one of the tenant's agents (NotFound for a missing or foreign agent)."""
    scoped = Scoped(session.ctx.child(agent_id=agent_id))
    scoped.agents.get(agent_id)
    return scoped


@router.get("/agents/{agent_id}/chat-streams", response_model=Page[ChatStreamOut], responses=responses(401, 404, 422))
def list_chat_streams(principal: CurrentPrincipal, agent_id: AgentId, page: PageDep) -> dict:
    """The agent's chat streams, most recently active first."""
    with principal.session() as session:
        scoped = _agent_scope(session, agent_id)
        return page.of(scoped.chat_streams.list(limit=page.limit + 1, offset=page.offset))


@router.get("/chat-streams/{stream_id}/messages", response_model=Page[MessageOut], responses=responses(401, 404, 422))
def list_messages(principal: CurrentPrincipal, stream_id: StreamId, page: PageDep) -> dict:
    """Messages of one chat stream, newest first."""
    with principal.session() as session:
        stream_ctx = session.scoped.chat_streams.context_for(stream_id)
        return page.of(Scoped(stream_ctx).messages.page(limit=page.limit + 1, offset=page.offset))


@router.get("/agents/{agent_id}/memories", response_model=Page[MemoryOut], responses=responses(401, 404, 422))
def list_memories(
    principal: CurrentPrincipal,
    agent_id: AgentId,
    page: PageDep,
    level: Annotated[Literal["agent", "platform", "chat"] | None, Query()] = None,
) -> dict:
    """All of the agent's memories (every level), newest first."""
    with principal.session() as session:
        scoped = _agent_scope(session, agent_id)
        return page.of(scoped.memories.list(level=level, limit=page.limit + 1, offset=page.offset))


@router.post("/agents/{agent_id}/memories", status_code=201, response_model=MemoryOut, responses=_ADD_ERRORS)
def add_memory(principal: CurrentPrincipal, agent_id: AgentId, body: MemoryCreate) -> dict:
    with principal.session(ADMIN, write=True) as session:
        scoped = _agent_scope(session, agent_id)
        ctx: IsolationContext = scoped.ctx
        if body.chat_stream_id is not None:
            ctx = scoped.chat_streams.context_for(body.chat_stream_id)
            if body.platform is not None and body.platform != ctx.platform:
                raise ApiError(422, "validation_error", "platform does not match the chat stream's platform")
        elif body.platform is not None:
            ctx = ctx.child(platform=body.platform)
        level = body.level or {3: "chat", 2: "platform"}.get(_depth(ctx), "agent")
        if _depth(ctx) < {"agent": 1, "platform": 2, "chat": 3}[level]:
            raise ApiError(
                422,
                "validation_error",
                f"a {level} memory needs " + ("a chat_stream_id" if level == "chat" else "a platform"),
            )
        return Scoped(ctx).memories.add(body.content, level=level, source="api")


def _depth(ctx: IsolationContext) -> int:
    return 3 if ctx.chat_stream_id else 2 if ctx.platform else 1


@router.delete("/agents/{agent_id}/memories", response_model=DeletedCount, responses=responses(401, 403, 404))
def delete_memories(principal: CurrentPrincipal, agent_id: AgentId) -> DeletedCount:
    """Delete every memory of the agent."""
    with principal.session(ADMIN, write=True) as session:
        return DeletedCount(deleted=_agent_scope(session, agent_id).memories.delete_all())


@router.delete(
    "/agents/{agent_id}/memories/{memory_id}",
    status_code=204,
    response_class=Response,
    responses=responses(401, 403, 404),
)
def delete_memory(principal: CurrentPrincipal, agent_id: AgentId, memory_id: MemoryId) -> Response:
    with principal.session(ADMIN, write=True) as session:
        _agent_scope(session, agent_id).memories.delete(memory_id)
    return Response(status_code=204)


@router.delete("/agents/{agent_id}/history", response_model=DeletedCounts, responses=responses(401, 403, 404))
def delete_history(principal: CurrentPrincipal, agent_id: AgentId) -> DeletedCounts:
    """Delete the agent's chat streams, messages, memories and LLM usage (the agent and keys stay)."""
    with principal.session(ADMIN, write=True) as session:
        return DeletedCounts(deleted=delete_agent_history(session.ctx, agent_id))
