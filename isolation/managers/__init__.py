"""The scoped managers, one module per area; `isolation.Scoped` hands them out bound to a context.

* `base`: what every manager shares (the context's WHERE clause, paging, the unit of work).
* `tenancy`: the tenant row, memberships, refresh tokens.
* `agents`: agents (and the configurator's agents page), API keys.
* `chat`: chat streams, messages, memories, LLM usage.
* `sql`: every hand-written statement on tenant tables (hot paths, and the one write path of
  messages and usage rows), kept together for review.

Managers never go back through `Scoped`: one that needs another table's manager builds it directly.
"""

from isolation.managers.agents import AgentManager, ApiKeyManager
from isolation.managers.base import MAX_PAGE, TableManager
from isolation.managers.chat import ChatStreamManager, LlmUsageManager, MemoryManager, MessageManager
from isolation.managers.tenancy import MembershipManager, RefreshTokenManager, TenantManager

__all__ = [
    "MAX_PAGE",
    "AgentManager",
    "ApiKeyManager",
    "ChatStreamManager",
    "LlmUsageManager",
    "MembershipManager",
    "MemoryManager",
    "MessageManager",
    "RefreshTokenManager",
    "TableManager",
    "TenantManager",
]
