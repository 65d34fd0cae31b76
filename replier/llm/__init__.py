"""LLM providers behind one small interface, usable on their own (the integration CLI reuses them).

from replier.llm import ChatMessage, LlmRequest, make_provider
provider = make_provider("openai", base_url="http://127.0.0.1:8000/v1", model="m", api_key="k")
result = await provider.complete(LlmRequest(messages=[ChatMessage("user", "hi")]))
"""

from replier.llm.base import (
    ChatMessage,
    LlmError,
    LlmRequest,
    LlmResult,
    Provider,
    ProviderConfig,
    build_prompt,
    resolve_provider_config,
)
from replier.llm.offline import OfflineProvider
from replier.llm.openai import OpenAIProvider
from replier.llm.registry import ProviderRegistry, make_provider

__all__ = [
    "ChatMessage",
    "LlmError",
    "LlmRequest",
    "LlmResult",
    "OfflineProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderConfig",
    "ProviderRegistry",
    "build_prompt",
    "make_provider",
    "resolve_provider_config",
]
