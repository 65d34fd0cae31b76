"""Request and response models of the configurator API.

Request models reject what the databases cannot store faithfully (NUL characters, lone surrogates,
non-finite numbers, absurdly deep JSON) with a 422 instead of failing later with a 500. Everything
else — unicode, quotes, SQL-looking or HTML text — is stored and returned verbatim.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, model_validator

from isolation.agent_config import AgentConfig, LlmSettings, Persona
from isolation.context import ID_CHARS

MAX_JSON_DEPTH = 16
T = TypeVar("T")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Database timestamps are naive UTC; responses say so explicitly ("...Z").
UtcDateTime = Annotated[datetime, AfterValidator(_utc)]


def check_storable(value: Any) -> None:
    """Raise ValueError for strings or numbers the databases cannot keep exactly (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("text must not contain NUL characters")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError("text must be valid unicode (no lone surrogates)") from exc
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("numbers must be finite")
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, depth + 1))
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, BaseModel):
            stack.append((item.model_dump(), depth))


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _storable(self):
        check_storable(self.model_dump(exclude_unset=True))
        return self


Name = Annotated[str, Field(min_length=1, max_length=100)]
Description = Annotated[str, Field(max_length=2000)]
Username = Annotated[str, Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Password = Annotated[str, Field(min_length=8, max_length=256, json_schema_extra={"writeOnly": True})]
Platform = Annotated[str, Field(min_length=1, max_length=64, pattern=rf"^{ID_CHARS}+$")]  # as the replier's


# ---------------------------------------------------------------------------------------------
# Auth
class RegisterRequest(RequestModel):
    username: Username
    email: Annotated[EmailStr, Field(max_length=254)]
    password: Password
    tenant_name: Name | None = None


class LoginRequest(RequestModel):
    username: str = Field(min_length=1, max_length=254, description="username or email")
    password: str = Field(min_length=1, max_length=256, json_schema_extra={"writeOnly": True})
    tenant_id: str | None = Field(
        default=None, max_length=128, description="which of the account's tenants to sign in to (default: oldest)"
    )


class RefreshRequest(RequestModel):
    refresh_token: str = Field(min_length=1, max_length=4096)


class DeleteAccountRequest(RequestModel):
    password: str = Field(min_length=1, max_length=256, json_schema_extra={"writeOnly": True})


class LogoutRequest(RequestModel):
    refresh_token: str = Field(min_length=1, max_length=4096)
    all_sessions: bool = Field(
        default=False, description="also end every other session of this account in this tenant (tokens stop working)"
    )


class AccountOut(BaseModel):
    id: str
    username: str
    email: str
    status: str
    created_at: UtcDateTime


class TenantOut(BaseModel):
    id: str
    name: str
    type: str
    status: str
    settings: dict[str, Any]
    created_at: UtcDateTime
    updated_at: UtcDateTime


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int = Field(description="access token lifetime in seconds")
    refresh_expires_in: int = Field(description="refresh token lifetime in seconds")


class AuthResponse(BaseModel):
    account: AccountOut
    tenant: TenantOut
    role: str
    tokens: TokenPair


class MembershipOut(BaseModel):
    tenant_id: str
    role: str


class MeResponse(BaseModel):
    account: AccountOut
    tenant: TenantOut
    role: str
    memberships: list[MembershipOut]


# ---------------------------------------------------------------------------------------------
# Tenant
class TenantUpdate(RequestModel):
    name: Name | None = None
    settings: dict[str, Any] | None = None


LimitValue = Annotated[int, Field(ge=0, le=2**62)]


class LimitValues(BaseModel):
    """A tenant's limits (0 = unlimited): chat messages per window for the tenant and for each agent,
    open replier connections, LLM tokens per budget day, API requests per window."""

    messages_per_minute: int
    agent_messages_per_minute: int
    connections: int
    tokens_per_day: int
    requests_per_minute: int


class LimitOverrides(BaseModel):
    """The operator's overrides; null (or absent) means the setting's default applies."""

    model_config = ConfigDict(extra="forbid")

    messages_per_minute: LimitValue | None = None
    agent_messages_per_minute: LimitValue | None = None
    connections: LimitValue | None = None
    tokens_per_day: LimitValue | None = None
    requests_per_minute: LimitValue | None = None


class TenantUsage(BaseModel):
    """Counts since the start of the budget day (`since`); `connections` are open right now."""

    since: UtcDateTime
    tokens: int
    llm_calls: int
    messages_in: int
    messages_out: int
    connections: int


class TenantLimitsOut(BaseModel):
    tenant_id: str
    limits: LimitValues = Field(description="effective limits")
    overrides: LimitOverrides
    defaults: LimitValues
    window_seconds: float = Field(description="window of the per-minute limits")
    budget_window_seconds: float = Field(description="the budget 'day' of tokens_per_day")


class OperatorTenant(BaseModel):
    id: str
    name: str
    type: str
    status: str
    created_at: UtcDateTime
    limits: LimitValues
    overrides: LimitOverrides


class TenantStats(BaseModel):
    agents: int
    api_keys: int
    active_api_keys: int
    members: int
    chat_streams: int
    messages: int
    memories: int
    llm_calls: int
    llm_prompt_tokens: int
    llm_completion_tokens: int
    llm_errors: int
    limits: LimitValues = Field(description="the tenant's effective limits (0 = unlimited)")
    usage: TenantUsage = Field(description="today's usage against them")


class DeletedCounts(BaseModel):
    deleted: dict[str, int] = Field(description="rows deleted per table")


# ---------------------------------------------------------------------------------------------
# Templates and agents
class TemplateOut(BaseModel):
    id: str
    name: str
    description: str
    persona: dict[str, Any]
    config: dict[str, Any]


class LlmInput(LlmSettings):
    """LLM settings as written by clients: `api_key` is write-only (encrypted, never returned).

    On update, `api_key: null` removes the stored key and leaving it out keeps it.
    """

    api_key: str | None = Field(default=None, min_length=1, max_length=1000, json_schema_extra={"writeOnly": True})


class AgentCreate(RequestModel):
    name: Name
    description: Description = ""
    template_id: str | None = Field(default=None, max_length=64)
    persona: Persona | None = Field(default=None, description="fields given override the template's")
    config: AgentConfig | None = Field(default=None, description="fields given override the template's")
    llm: LlmInput | None = None
    status: Literal["active", "disabled"] = "active"


class AgentUpdate(RequestModel):
    name: Name | None = None
    description: Description | None = None
    persona: Persona | None = Field(default=None, description="fields given replace the current ones")
    config: AgentConfig | None = Field(default=None, description="fields given replace the current ones")
    llm: LlmInput | None = None
    status: Literal["active", "disabled"] | None = None


class AgentOut(BaseModel):
    id: str
    name: str
    description: str
    template_id: str | None
    persona: dict[str, Any]
    config: dict[str, Any]
    llm: dict[str, Any]
    has_api_key: bool = Field(description="whether an LLM provider key is stored (it is never returned)")
    status: str
    version: int
    created_at: UtcDateTime
    updated_at: UtcDateTime


# ---------------------------------------------------------------------------------------------
# API keys
class ApiKeyCreate(RequestModel):
    name: Name = "default"
    permissions: list[Literal["chat"]] = Field(default_factory=lambda: ["chat"], min_length=1, max_length=5)
    expires_at: datetime | None = Field(default=None, description="UTC when naive; must be in the future")


class ApiKeyOut(BaseModel):
    id: str
    agent_id: str
    name: str
    prefix: str = Field(description="first characters of the secret, to recognise the key")
    permissions: list[str]
    status: str
    expires_at: UtcDateTime | None
    last_used_at: UtcDateTime | None
    usage_count: int
    created_at: UtcDateTime
    revoked_at: UtcDateTime | None


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="the API key itself: shown once, store it now")


# ---------------------------------------------------------------------------------------------
# History and memory
class ChatStreamOut(BaseModel):
    id: str
    agent_id: str
    platform: str
    kind: str
    group_id: str | None
    user_id: str | None
    group_name: str | None
    created_at: UtcDateTime
    last_active_at: UtcDateTime


class MessageOut(BaseModel):
    id: str
    agent_id: str
    platform: str
    chat_stream_id: str
    message_id: str
    direction: str
    sender_user_id: str | None
    sender_nickname: str | None
    text: str
    segments: Any
    reply_to: str | None
    platform_message_id: str | None = Field(
        default=None, description="replies: the platform's id of the delivered message (from the adapter's echo)"
    )
    created_at: UtcDateTime


class MemoryCreate(RequestModel):
    content: str = Field(min_length=1, max_length=4000)
    level: Literal["agent", "platform", "chat"] | None = Field(
        default=None, description="default: chat with chat_stream_id, platform with platform, else agent"
    )
    platform: Platform | None = None
    chat_stream_id: str | None = Field(default=None, max_length=128)


class MemoryOut(BaseModel):
    id: str
    agent_id: str
    level: str
    platform: str | None
    chat_stream_id: str | None
    content: str
    source: str
    created_at: UtcDateTime


class DeletedCount(BaseModel):
    deleted: int


class Page(BaseModel, Generic[T]):
    items: list[T]
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page, null on the last page")


class HealthOut(BaseModel):
    status: Literal["ok"]
    database: str
    schema_version: int
    checks: dict[str, str] = Field(description='"database", "write", "disk": "ok", "skipped" or "error: ..."')
