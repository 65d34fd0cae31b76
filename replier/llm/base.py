"""The provider interface, the prompt and how an agent's settings pick a provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from isolation.agent_config import LlmSettings, Persona


class LlmError(RuntimeError):
    """A provider call failed for good (after retries); the message is safe to log and store."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclass(slots=True)
class LlmRequest:
    """What to complete. `messages` is the chat prompt; the structured fields let the offline
    responder answer without parsing the prompt."""

    messages: list[ChatMessage]
    model: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    timeout: float | None = None
    persona: Persona | None = None
    agent_name: str = "assistant"
    memories: list[str] = field(default_factory=list)
    user_text: str = ""
    user_name: str | None = None


@dataclass(frozen=True, slots=True)
class LlmResult:
    text: str
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    offline: bool = False


class Provider(Protocol):
    name: str
    offline: bool

    async def complete(self, request: LlmRequest) -> LlmResult: ...

    async def extract_memory(self, request: LlmRequest, reply: str) -> str | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A resolved provider choice: `kind` is "openai" or "offline"."""

    kind: str
    model: str
    base_url: str | None = None
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    timeout: float = 30.0


def resolve_provider_config(
    llm: LlmSettings,
    agent_api_key: str | None,
    *,
    default_provider: str = "",
    default_base_url: str = "",
    default_model: str = "",
    default_api_key: str = "",
) -> ProviderConfig:
    """An agent's settings with the global defaults filled in; nothing usable means offline."""
    kind = llm.provider
    base_url = str(llm.base_url).rstrip("/") if llm.base_url else None
    model = llm.model
    api_key = agent_api_key
    if kind == "default":
        kind = (default_provider or "offline").lower()
        base_url = base_url or (default_base_url.rstrip("/") or None)
        model = model or default_model or None
        api_key = api_key or default_api_key or None
    elif kind == "openai":
        base_url = base_url or (default_base_url.rstrip("/") or None)
        model = model or default_model or None
        api_key = api_key or default_api_key or None
    if kind != "openai" or not base_url or not model:
        return ProviderConfig("offline", "offline", temperature=llm.temperature, max_tokens=llm.max_tokens)
    return ProviderConfig(
        "openai",
        model,
        base_url=base_url,
        api_key=api_key,
        temperature=llm.temperature,
        max_tokens=llm.max_tokens,
        timeout=llm.timeout_seconds,
    )


def persona_text(persona: Persona, agent_name: str) -> str:
    lines = [
        f"You are {agent_name}, a chat agent.",
        f"Personality: {persona.personality}",
        f"Reply style: {persona.reply_style}",
    ]
    if persona.interests:
        lines.append("Interests: " + ", ".join(persona.interests))
    if persona.plan_style:
        lines.append(f"Plan style: {persona.plan_style}")
    if persona.states:
        lines.append("Possible states: " + ", ".join(persona.states))
    return "\n".join(lines)


def build_prompt(
    *,
    persona: Persona,
    agent_name: str,
    memories: list[str],
    history: list[tuple[str, str, str | None]],
    user_text: str,
    user_name: str | None = None,
) -> list[ChatMessage]:
    """System prompt (persona + memories), the stream's history, then the new user message.

    `history` holds (direction "in"|"out", text, sender name) oldest first, without the new message.
    """
    system = persona_text(persona, agent_name)
    if memories:
        system += "\nThings you remember about this chat:\n" + "\n".join(f"- {m}" for m in memories)
    system += "\nAnswer the last user message in the conversation."
    messages = [ChatMessage("system", system)]
    for direction, text, sender in history:
        if direction == "out":
            messages.append(ChatMessage("assistant", text))
        else:
            messages.append(ChatMessage("user", f"{sender}: {text}" if sender else text))
    messages.append(ChatMessage("user", f"{user_name}: {user_text}" if user_name else user_text))
    return messages
