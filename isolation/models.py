"""peewee models of the schema. Private to `isolation/`: application code uses the scoped managers.

Tables are created by the versioned migrations (`isolation/migrations/`), never from these classes,
so importing this module does no DDL. Every tenant table's primary key starts with `tenant_id`.
"""

from __future__ import annotations

import json

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DateTimeField,
    IntegerField,
    Model,
    TextField,
)

from isolation.db import database
from isolation.errors import InvalidValueError


def refuse_nul(value):
    """`value`, or `InvalidValueError` when it is text with NUL characters (PostgreSQL cannot store them).

    The one NUL check: the model fields below and the hand-written inserts (`managers/sql.py`) use it.
    """
    if isinstance(value, str) and "\x00" in value:
        raise InvalidValueError("text must not contain NUL (\\x00) characters")
    return value


def json_text(value):
    """Strict, compact JSON text (None stays NULL): readers (e.g. the agents page in
    `managers/sql.py`) may splice the text in as is."""
    if value is None:
        return None
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN or an infinity (or a circular structure): not JSON
        raise InvalidValueError(f"value cannot be stored as JSON: {exc}") from exc


class SafeCharField(CharField):
    """CharField that refuses NUL characters on every database (PostgreSQL cannot store them)."""

    def db_value(self, value):
        return super().db_value(refuse_nul(value))


class SafeTextField(TextField):
    """TextField that refuses NUL characters on every database (PostgreSQL cannot store them)."""

    def db_value(self, value):
        return super().db_value(refuse_nul(value))


class JSONField(TextField):
    """JSON stored as text: portable across SQLite and PostgreSQL."""

    def db_value(self, value):
        return json_text(value)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Account(BaseModel):
    id = SafeCharField(primary_key=True)
    username = SafeCharField(unique=True)
    email = SafeCharField(unique=True)
    password_hash = SafeTextField()
    status = SafeCharField(default="active")
    created_at = DateTimeField()
    # m0006. No default here on purpose: inserts leave the column to the database (FALSE), since the
    # application role may not write it on PostgreSQL.
    is_operator = BooleanField()

    class Meta:
        table_name = "accounts"


class Tenant(BaseModel):
    id = SafeCharField(primary_key=True)
    name = SafeCharField()
    type = SafeCharField()
    status = SafeCharField(default="active")
    settings = JSONField(default=dict)
    created_at = DateTimeField()
    updated_at = DateTimeField()
    # m0006: the operator's overrides of the limit defaults (NULL: the default; 0: unlimited).
    limit_messages_per_minute = BigIntegerField(null=True)
    limit_agent_messages_per_minute = BigIntegerField(null=True)
    limit_connections = BigIntegerField(null=True)
    limit_tokens_per_day = BigIntegerField(null=True)
    limit_requests_per_minute = BigIntegerField(null=True)
    limits_updated_at = DateTimeField(null=True)

    class Meta:
        table_name = "tenants"


class AgentTemplate(BaseModel):
    id = SafeCharField(primary_key=True)
    name = SafeCharField()
    description = SafeTextField()
    persona = JSONField()
    config = JSONField()
    created_at = DateTimeField()

    class Meta:
        table_name = "agent_templates"


class TenantModel(BaseModel):
    """Marker base of every table that belongs to a tenant (row-level security on PostgreSQL)."""

    tenant_id = SafeCharField()


class Membership(TenantModel):
    account_id = SafeCharField()
    role = SafeCharField()
    created_at = DateTimeField()

    class Meta:
        table_name = "memberships"
        primary_key = CompositeKey("tenant_id", "account_id")


class RefreshToken(TenantModel):
    jti = SafeCharField()
    account_id = SafeCharField()
    expires_at = DateTimeField()
    revoked_at = DateTimeField(null=True)
    replaced_by = SafeCharField(null=True)
    created_at = DateTimeField()
    # The sign-in session (the tokens' `sid`); NULL only on rows from before schema version 3.
    session_id = SafeCharField(null=True)

    class Meta:
        table_name = "refresh_tokens"
        primary_key = CompositeKey("tenant_id", "jti")


class Agent(TenantModel):
    id = SafeCharField()
    name = SafeCharField()
    description = SafeTextField(default="")
    template_id = SafeCharField(null=True)
    persona = JSONField()
    config = JSONField()
    llm = JSONField()
    # The agent's LLM key (`llm.api_key`), Fernet-encrypted; the column keeps its first name.
    encrypted_api_key = SafeTextField(null=True, column_name="llm_secret")
    status = SafeCharField(default="active")
    version = IntegerField(default=1)
    created_at = DateTimeField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "agents"
        primary_key = CompositeKey("tenant_id", "id")


class ApiKey(TenantModel):
    id = SafeCharField()
    agent_id = SafeCharField()
    name = SafeCharField()
    key_hash = SafeCharField()
    prefix = SafeCharField()
    permissions = JSONField()
    status = SafeCharField(default="active")
    expires_at = DateTimeField(null=True)
    last_used_at = DateTimeField(null=True)
    usage_count = BigIntegerField(default=0)
    created_at = DateTimeField()
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_keys"
        primary_key = CompositeKey("tenant_id", "id")


class ChatStream(TenantModel):
    id = SafeCharField()
    agent_id = SafeCharField()
    platform = SafeCharField()
    kind = SafeCharField()
    group_id = SafeCharField(null=True)
    user_id = SafeCharField(null=True)
    group_name = SafeCharField(null=True)
    created_at = DateTimeField()
    last_active_at = DateTimeField()

    class Meta:
        table_name = "chat_streams"
        primary_key = CompositeKey("tenant_id", "id")


class Message(TenantModel):
    id = SafeCharField()
    agent_id = SafeCharField()
    platform = SafeCharField()
    chat_stream_id = SafeCharField()
    message_id = SafeCharField()
    direction = SafeCharField()
    sender_user_id = SafeCharField(null=True)
    sender_nickname = SafeCharField(null=True)
    text = SafeTextField()
    segments = JSONField()
    reply_to = SafeCharField(null=True)
    created_at = DateTimeField()
    delivered_at = DateTimeField(null=True)  # reply rows: handed to a connection (m0004)
    content_hash = SafeCharField(null=True)  # inbound rows: SHA-256 of the content (m0004)
    platform_message_id = SafeCharField(null=True)  # reply rows: the platform's id, from an echo (m0004)

    class Meta:
        table_name = "messages"
        primary_key = CompositeKey("tenant_id", "id")


class Memory(TenantModel):
    id = SafeCharField()
    agent_id = SafeCharField()
    level = SafeCharField()
    platform = SafeCharField(null=True)
    chat_stream_id = SafeCharField(null=True)
    content = SafeTextField()
    source = SafeCharField()
    created_at = DateTimeField()

    class Meta:
        table_name = "memories"
        primary_key = CompositeKey("tenant_id", "id")


class LlmUsage(TenantModel):
    id = SafeCharField()
    agent_id = SafeCharField()
    platform = SafeCharField()
    chat_stream_id = SafeCharField(null=True)
    provider = SafeCharField()
    model = SafeCharField()
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    latency_ms = IntegerField(default=0)
    outcome = SafeCharField()
    error = SafeTextField(null=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "llm_usage"
        primary_key = CompositeKey("tenant_id", "id")


class ReplierPresence(TenantModel):
    """Open replier connections of a tenant in one replier process, as that process last reported (m0006)."""

    process_id = SafeCharField()
    connections = IntegerField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "replier_presence"
        primary_key = CompositeKey("tenant_id", "process_id")


# Children before parents: the order cleanup deletes in.
TENANT_MODELS: tuple[type[TenantModel], ...] = (
    ReplierPresence,
    LlmUsage,
    Memory,
    Message,
    ChatStream,
    ApiKey,
    Agent,
    RefreshToken,
    Membership,
)
TENANT_TABLES: tuple[str, ...] = tuple(m._meta.table_name for m in TENANT_MODELS)
