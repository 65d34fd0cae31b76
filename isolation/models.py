"""peewee models of the schema. Private to `isolation/`: application code uses the scoped managers.

Tables are created by the versioned migrations (`isolation/migrations/`), never from these classes,
so importing this module does no DDL. Every tenant table's primary key starts with `tenant_id`.
"""

from __future__ import annotations

import json

from peewee import (
    BigIntegerField,
    CharField,
    CompositeKey,
    DateTimeField,
    IntegerField,
    Model,
    TextField,
)

from isolation.db import database


class JSONField(TextField):
    """JSON stored as text: portable across SQLite and PostgreSQL."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Account(BaseModel):
    id = CharField(primary_key=True)
    username = CharField(unique=True)
    email = CharField(unique=True)
    password_hash = TextField()
    status = CharField(default="active")
    created_at = DateTimeField()

    class Meta:
        table_name = "accounts"


class Tenant(BaseModel):
    id = CharField(primary_key=True)
    name = CharField()
    type = CharField()
    status = CharField(default="active")
    settings = JSONField(default=dict)
    created_at = DateTimeField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "tenants"


class AgentTemplate(BaseModel):
    id = CharField(primary_key=True)
    name = CharField()
    description = TextField()
    persona = JSONField()
    config = JSONField()
    created_at = DateTimeField()

    class Meta:
        table_name = "agent_templates"


class TenantModel(BaseModel):
    """Marker base of every table that belongs to a tenant (row-level security on PostgreSQL)."""

    tenant_id = CharField()


class Membership(TenantModel):
    account_id = CharField()
    role = CharField()
    created_at = DateTimeField()

    class Meta:
        table_name = "memberships"
        primary_key = CompositeKey("tenant_id", "account_id")


class RefreshToken(TenantModel):
    jti = CharField()
    account_id = CharField()
    expires_at = DateTimeField()
    revoked_at = DateTimeField(null=True)
    replaced_by = CharField(null=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "refresh_tokens"
        primary_key = CompositeKey("tenant_id", "jti")


class Agent(TenantModel):
    id = CharField()
    name = CharField()
    description = TextField(default="")
    template_id = CharField(null=True)
    persona = JSONField()
    config = JSONField()
    llm = JSONField()
    llm_secret = TextField(null=True)
    status = CharField(default="active")
    version = IntegerField(default=1)
    created_at = DateTimeField()
    updated_at = DateTimeField()

    class Meta:
        table_name = "agents"
        primary_key = CompositeKey("tenant_id", "id")


class ApiKey(TenantModel):
    id = CharField()
    agent_id = CharField()
    name = CharField()
    key_hash = CharField()
    prefix = CharField()
    permissions = JSONField()
    status = CharField(default="active")
    expires_at = DateTimeField(null=True)
    last_used_at = DateTimeField(null=True)
    usage_count = BigIntegerField(default=0)
    created_at = DateTimeField()
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_keys"
        primary_key = CompositeKey("tenant_id", "id")


class ChatStream(TenantModel):
    id = CharField()
    agent_id = CharField()
    platform = CharField()
    kind = CharField()
    group_id = CharField(null=True)
    user_id = CharField(null=True)
    group_name = CharField(null=True)
    created_at = DateTimeField()
    last_active_at = DateTimeField()

    class Meta:
        table_name = "chat_streams"
        primary_key = CompositeKey("tenant_id", "id")


class Message(TenantModel):
    id = CharField()
    agent_id = CharField()
    platform = CharField()
    chat_stream_id = CharField()
    message_id = CharField()
    direction = CharField()
    sender_user_id = CharField(null=True)
    sender_nickname = CharField(null=True)
    text = TextField()
    segments = JSONField()
    reply_to = CharField(null=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "messages"
        primary_key = CompositeKey("tenant_id", "id")


class Memory(TenantModel):
    id = CharField()
    agent_id = CharField()
    level = CharField()
    platform = CharField(null=True)
    chat_stream_id = CharField(null=True)
    content = TextField()
    source = CharField()
    created_at = DateTimeField()

    class Meta:
        table_name = "memories"
        primary_key = CompositeKey("tenant_id", "id")


class LlmUsage(TenantModel):
    id = CharField()
    agent_id = CharField()
    platform = CharField()
    chat_stream_id = CharField(null=True)
    provider = CharField()
    model = CharField()
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    latency_ms = IntegerField(default=0)
    outcome = CharField()
    error = TextField(null=True)
    created_at = DateTimeField()

    class Meta:
        table_name = "llm_usage"
        primary_key = CompositeKey("tenant_id", "id")


# Children before parents: the order cleanup deletes in.
TENANT_MODELS: tuple[type[TenantModel], ...] = (
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
