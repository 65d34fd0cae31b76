"""The provider interface, the prompt and how an agent's settings pick a provider."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from isolation.agent_config import LlmSettings, Persona
from isolation.egress import EgressSettings, operator_key_allowed


class LlmError(RuntimeError):
    """A provider call failed for good (after retries); the message is safe to log and store."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclass(slots=True)
class LlmRequest:
    """What to complete. `messages` is the chat prompt; the structured fields let the offline
    responder answer without parsing the prompt.

    `tenant` picks the fair-queue share of a shared endpoint (`replier.llm.fairness`); `deadline` (a
    `time.monotonic()` instant) bounds the whole call, slot wait and retries included, where `timeout`
    bounds one attempt; `gate` runs once a slot is held, before each attempt, and raises to cancel
    the call (the agent's breaker opened while this call waited)."""

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
    tenant: str = ""
    deadline: float | None = None
    gate: Callable[[], None] | None = None


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
    """A resolved provider choice: `kind` is "openai" or "offline". `trusted`: `base_url` is one of the
    operator's own endpoints (exempt from the connect-time address check)."""

    kind: str
    model: str
    base_url: str | None = None
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    timeout: float = 30.0
    trusted: bool = False


def resolve_provider_config(
    llm: LlmSettings,
    agent_api_key: str | None,
    *,
    default_provider: str = "",
    default_base_url: str = "",
    default_model: str = "",
    default_api_key: str = "",
    egress: EgressSettings | None = None,
) -> ProviderConfig:
    """An agent's settings with the global defaults filled in; nothing usable means offline.

    The operator's key (`default_api_key`) is filled in only when the resolved base URL is one of the
    operator's own endpoints (`default_base_url`, LLM_BASE_URL, LLM_OPERATOR_KEY_URLS): an agent with
    its own URL uses its own key or none. Checked here at every use, not only when the agent is saved,
    since rows saved before this rule may break it.
    """
    kind = llm.provider
    base_url = str(llm.base_url).rstrip("/") if llm.base_url else None
    model = llm.model
    api_key = agent_api_key
    if kind == "default":
        kind = (default_provider or "offline").lower()
    if llm.provider in ("default", "openai"):
        base_url = base_url or (default_base_url.rstrip("/") or None)
        model = model or default_model or None
    if kind != "openai" or not base_url or not model:
        return ProviderConfig("offline", "offline", temperature=llm.temperature, max_tokens=llm.max_tokens)
    trusted = operator_key_allowed(base_url, policy=egress, also=[default_base_url])
    if trusted:
        api_key = api_key or default_api_key or None
    return ProviderConfig(
        "openai",
        model,
        base_url=base_url,
        api_key=api_key,
        temperature=llm.temperature,
        max_tokens=llm.max_tokens,
        timeout=llm.timeout_seconds,
        trusted=trusted,
    )


@dataclass(frozen=True, slots=True)
class LlmDefaults:
    """The operator's global LLM settings, filled into agents that leave theirs to the default."""

    provider: str = ""
    base_url: str = ""
    model: str = ""
    api_key: str = field(default="", repr=False)

    def resolve(self, llm: LlmSettings, agent_api_key: str | None) -> ProviderConfig:
        return resolve_provider_config(
            llm,
            agent_api_key,
            default_provider=self.provider,
            default_base_url=self.base_url,
            default_model=self.model,
            default_api_key=self.api_key,
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


def chat_request(
    config: ProviderConfig,
    persona: Persona,
    agent_name: str,
    memories: list[str],
    history: list[tuple[str, str, str | None]],
    user_text: str,
    user_name: str | None,
    *,
    prompt: bool,
) -> LlmRequest:
    """The request answering one chat message with `config`. The structured fields are always set (the
    offline responder reads them); the chat prompt is built only when `prompt` (a real model needs it)."""
    messages = []
    if prompt:
        messages = build_prompt(
            persona=persona, agent_name=agent_name, memories=memories, history=history, user_text=user_text,
            user_name=user_name,
        )  # fmt: skip
    return LlmRequest(
        messages, config.model, config.temperature, config.max_tokens, config.timeout,
        persona, agent_name, memories, user_text, user_name,
    )  # fmt: skip
