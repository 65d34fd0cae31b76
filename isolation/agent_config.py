"""The shape of an agent's persona, config and LLM settings, shared by configurator and replier.

The configurator validates input with these models; the replier reads stored JSON through them, so
both always agree on defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

_TEXT = 2000


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personality: str = Field(default="friendly and helpful", max_length=_TEXT)
    reply_style: str = Field(default="short and natural", max_length=_TEXT)
    interests: list[str] = Field(default_factory=list, max_length=50)
    plan_style: str = Field(default="", max_length=_TEXT)
    private_plan_style: str = Field(default="", max_length=_TEXT)
    states: list[str] = Field(default_factory=list, max_length=50)
    state_probability: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("interests", "states")
    @classmethod
    def _short_items(cls, items: list[str]) -> list[str]:
        for item in items:
            if len(item) > 200:
                raise ValueError("items must be at most 200 characters")
        return items


class ChatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_context_size: int = Field(default=20, ge=0, le=200)
    reply_mode: Literal["always", "mention"] = "always"
    talk_frequency: float = Field(default=1.0, ge=0.0, le=1.0)


class MemoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_memories: int = Field(default=20, ge=0, le=200)


class MoodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    decay_rate: float = Field(default=0.95, ge=0.0, le=1.0)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chat: ChatConfig = Field(default_factory=ChatConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    mood: MoodConfig = Field(default_factory=MoodConfig)


class LlmSettings(BaseModel):
    """What is stored in `agents.llm` (never the provider key: that is encrypted in `Agent.encrypted_api_key`).

    `provider="default"` means "use the replier's global default provider from its settings", which
    itself falls back to the offline responder when none is configured.
    """

    model_config = ConfigDict(extra="forbid")

    provider: Literal["default", "openai", "offline"] = "default"
    model: str | None = Field(default=None, max_length=200)
    base_url: HttpUrl | None = None
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1, le=32_000)
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    def stored(self) -> dict:
        return self.model_dump(mode="json")
