"""`Scoped`: the only way application code reads or writes tenant tables.

`Scoped(ctx).agents.get(agent_id)` runs one statement whose WHERE clause carries every filter of the
context (tenant, and agent/platform/chat stream when the context has them and the table has the
column). Inserts take their tenant columns from the context, never from arguments. A missing row and
another tenant's row raise the same `NotFound`. Methods that need a narrower context than the one
given raise `IsolationViolationError`. Results are plain dicts, so no caller can `.save()` a model
instance around the scope. The managers themselves live in `isolation.managers`, one module per area.
"""

from __future__ import annotations

from typing import Any

from isolation.context import IsolationContext
from isolation.errors import IsolationViolationError
from isolation.managers import (
    AgentManager,
    ApiKeyManager,
    ChatStreamManager,
    LlmUsageManager,
    MembershipManager,
    MemoryManager,
    MessageManager,
    RefreshTokenManager,
    TenantManager,
)

# Attribute -> manager class; each manager is built on first use and kept (like `cached_property`).
_MANAGERS: dict[str, type] = {
    "tenant": TenantManager,
    "memberships": MembershipManager,
    "refresh_tokens": RefreshTokenManager,
    "agents": AgentManager,
    "api_keys": ApiKeyManager,
    "chat_streams": ChatStreamManager,
    "messages": MessageManager,
    "memories": MemoryManager,
    "llm_usage": LlmUsageManager,
}


class Scoped:
    """Entry point: `Scoped(ctx).agents`, `.api_keys`, `.messages`, … all bound to `ctx`."""

    tenant: TenantManager
    memberships: MembershipManager
    refresh_tokens: RefreshTokenManager
    agents: AgentManager
    api_keys: ApiKeyManager
    chat_streams: ChatStreamManager
    messages: MessageManager
    memories: MemoryManager
    llm_usage: LlmUsageManager

    def __init__(self, ctx: IsolationContext) -> None:
        if not isinstance(ctx, IsolationContext):
            raise IsolationViolationError("Scoped needs an IsolationContext")
        self.ctx = ctx

    def __getattr__(self, name: str) -> Any:
        """Only called for a manager not built yet: build it for this context and keep it."""
        manager_class = _MANAGERS.get(name)
        if manager_class is None:
            raise AttributeError(f"'Scoped' object has no attribute {name!r}")
        manager = manager_class(self.ctx)
        setattr(self, name, manager)
        return manager
