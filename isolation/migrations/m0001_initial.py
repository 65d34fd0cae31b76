"""The initial schema: accounts, tenants, memberships, refresh tokens, agent templates, agents, API keys,
chat streams, messages, memories and LLM usage, in portable DDL, plus row-level security on PostgreSQL."""

from __future__ import annotations

VERSION = 1
NAME = "initial schema"

# `{ts}` is the timestamp type of the dialect; everything else is portable SQL.
TABLES = """
CREATE TABLE accounts (
    id VARCHAR(40) PRIMARY KEY,
    username VARCHAR(64) NOT NULL UNIQUE,
    email VARCHAR(254) NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    status VARCHAR(16) NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at {ts} NOT NULL
);
CREATE TABLE tenants (
    id VARCHAR(40) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    type VARCHAR(16) NOT NULL CHECK (type IN ('personal', 'enterprise')),
    status VARCHAR(16) NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    settings TEXT NOT NULL DEFAULT '{{}}',
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL
);
CREATE INDEX tenants_name ON tenants (name);
CREATE TABLE agent_templates (
    id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    description TEXT NOT NULL,
    persona TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at {ts} NOT NULL
);
CREATE TABLE memberships (
    tenant_id VARCHAR(40) NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    account_id VARCHAR(40) NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    role VARCHAR(16) NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
);
CREATE INDEX memberships_account ON memberships (account_id);
CREATE TABLE refresh_tokens (
    tenant_id VARCHAR(40) NOT NULL,
    jti VARCHAR(64) NOT NULL,
    account_id VARCHAR(40) NOT NULL,
    expires_at {ts} NOT NULL,
    revoked_at {ts},
    replaced_by VARCHAR(64),
    created_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, jti),
    FOREIGN KEY (tenant_id, account_id) REFERENCES memberships (tenant_id, account_id) ON DELETE CASCADE
);
CREATE INDEX refresh_tokens_account ON refresh_tokens (tenant_id, account_id);
CREATE TABLE agents (
    tenant_id VARCHAR(40) NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id VARCHAR(40) NOT NULL,
    name VARCHAR(128) NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    template_id VARCHAR(64) REFERENCES agent_templates (id),
    persona TEXT NOT NULL,
    config TEXT NOT NULL,
    llm TEXT NOT NULL,
    llm_secret TEXT,
    status VARCHAR(16) NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    version INTEGER NOT NULL DEFAULT 1,
    created_at {ts} NOT NULL,
    updated_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);
CREATE TABLE api_keys (
    tenant_id VARCHAR(40) NOT NULL,
    id VARCHAR(40) NOT NULL,
    agent_id VARCHAR(40) NOT NULL,
    name VARCHAR(128) NOT NULL,
    key_hash CHAR(64) NOT NULL,
    prefix VARCHAR(16) NOT NULL,
    permissions TEXT NOT NULL,
    status VARCHAR(16) NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    expires_at {ts},
    last_used_at {ts},
    usage_count BIGINT NOT NULL DEFAULT 0,
    created_at {ts} NOT NULL,
    revoked_at {ts},
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, key_hash),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX api_keys_hash ON api_keys (key_hash);
CREATE INDEX api_keys_agent ON api_keys (tenant_id, agent_id);
CREATE TABLE chat_streams (
    tenant_id VARCHAR(40) NOT NULL,
    id VARCHAR(40) NOT NULL,
    agent_id VARCHAR(40) NOT NULL,
    platform VARCHAR(64) NOT NULL,
    kind VARCHAR(8) NOT NULL CHECK (kind IN ('group', 'private')),
    group_id VARCHAR(128),
    user_id VARCHAR(128),
    group_name VARCHAR(256),
    created_at {ts} NOT NULL,
    last_active_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, agent_id, id),
    CHECK ((kind = 'group' AND group_id IS NOT NULL) OR (kind = 'private' AND user_id IS NOT NULL)),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX chat_streams_agent ON chat_streams (tenant_id, agent_id, last_active_at);
CREATE TABLE messages (
    tenant_id VARCHAR(40) NOT NULL,
    id VARCHAR(40) NOT NULL,
    agent_id VARCHAR(40) NOT NULL,
    platform VARCHAR(64) NOT NULL,
    chat_stream_id VARCHAR(40) NOT NULL,
    message_id VARCHAR(128) NOT NULL,
    direction VARCHAR(3) NOT NULL CHECK (direction IN ('in', 'out')),
    sender_user_id VARCHAR(128),
    sender_nickname VARCHAR(256),
    text TEXT NOT NULL,
    segments TEXT NOT NULL,
    reply_to VARCHAR(128),
    created_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, chat_stream_id, message_id),
    FOREIGN KEY (tenant_id, agent_id, chat_stream_id)
        REFERENCES chat_streams (tenant_id, agent_id, id) ON DELETE CASCADE
);
CREATE INDEX messages_stream_time ON messages (tenant_id, chat_stream_id, created_at);
CREATE INDEX messages_agent ON messages (tenant_id, agent_id);
CREATE TABLE memories (
    tenant_id VARCHAR(40) NOT NULL,
    id VARCHAR(40) NOT NULL,
    agent_id VARCHAR(40) NOT NULL,
    level VARCHAR(16) NOT NULL CHECK (level IN ('agent', 'platform', 'chat')),
    platform VARCHAR(64),
    chat_stream_id VARCHAR(40),
    content TEXT NOT NULL,
    source VARCHAR(32) NOT NULL,
    created_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, id),
    CHECK ((level = 'agent' AND platform IS NULL AND chat_stream_id IS NULL)
        OR (level = 'platform' AND platform IS NOT NULL AND chat_stream_id IS NULL)
        OR (level = 'chat' AND platform IS NOT NULL AND chat_stream_id IS NOT NULL)),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, agent_id, chat_stream_id)
        REFERENCES chat_streams (tenant_id, agent_id, id) ON DELETE CASCADE
);
CREATE INDEX memories_agent ON memories (tenant_id, agent_id, level, created_at);
CREATE TABLE llm_usage (
    tenant_id VARCHAR(40) NOT NULL,
    id VARCHAR(40) NOT NULL,
    agent_id VARCHAR(40) NOT NULL,
    platform VARCHAR(64) NOT NULL,
    chat_stream_id VARCHAR(40),
    provider VARCHAR(32) NOT NULL,
    model VARCHAR(128) NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER NOT NULL DEFAULT 0,
    outcome VARCHAR(16) NOT NULL CHECK (outcome IN ('ok', 'error', 'offline')),
    error TEXT,
    created_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, agent_id, chat_stream_id)
        REFERENCES chat_streams (tenant_id, agent_id, id) ON DELETE CASCADE
);
CREATE INDEX llm_usage_agent ON llm_usage (tenant_id, agent_id, created_at);
"""

RLS_TABLES = (
    "memberships",
    "refresh_tokens",
    "agents",
    "api_keys",
    "chat_streams",
    "messages",
    "memories",
    "llm_usage",
)

# Narrow, privileged lookups that must work before a tenant is known. They run as the schema owner
# (SECURITY DEFINER) and return only the columns the caller needs.
FUNCTIONS = """
CREATE FUNCTION mt_lookup_api_key(p_hash TEXT)
RETURNS TABLE (tenant_id VARCHAR, id VARCHAR, agent_id VARCHAR, status VARCHAR, expires_at TIMESTAMP)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT k.tenant_id, k.id, k.agent_id, k.status, k.expires_at FROM api_keys k WHERE k.key_hash = p_hash
$$;
CREATE FUNCTION mt_account_memberships(p_account TEXT)
RETURNS TABLE (tenant_id VARCHAR, role VARCHAR, created_at TIMESTAMP)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT m.tenant_id, m.role, m.created_at FROM memberships m WHERE m.account_id = p_account
$$;
CREATE FUNCTION mt_tenants_with_prefix(p_prefix TEXT)
RETURNS TABLE (id VARCHAR)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT t.id FROM tenants t WHERE substr(t.name, 1, length(p_prefix)) = p_prefix
$$;
"""

FUNCTION_SIGNATURES = ("mt_lookup_api_key(TEXT)", "mt_account_memberships(TEXT)", "mt_tenants_with_prefix(TEXT)")


def statements(dialect: str) -> list[str]:
    ts = "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
    return [s.strip() for s in TABLES.format(ts=ts).split(";") if s.strip()]


def apply(conn, dialect: str, app_role: str | None) -> None:
    for statement in statements(dialect):
        conn.execute_sql(statement)
    if dialect != "postgresql":
        return
    for table in (*RLS_TABLES, "tenants"):
        column = "id" if table == "tenants" else "tenant_id"
        conn.execute_sql(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        conn.execute_sql(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING ({column} = current_setting('app.tenant_id', true)) "
            f"WITH CHECK ({column} = current_setting('app.tenant_id', true))"
        )
    for function in FUNCTIONS.split("$$;"):
        if function.strip():
            conn.execute_sql(function.strip() + "$$")
    for signature in FUNCTION_SIGNATURES:
        conn.execute_sql(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
