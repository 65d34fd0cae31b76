"""Per-tenant limits, suspension and operators (tenant fairness and quotas).

- `tenants.limit_*`: the operator's per-tenant overrides of the limit defaults (NULL: the setting's
  default applies; 0: unlimited), `limits_updated_at` when they last changed. `tenants.status`
  ('active' / 'suspended') exists since the first schema.
- `accounts.is_operator`: operator accounts (`invoke create-operator`). Operators are not members of
  any tenant through this flag; on PostgreSQL the application role may not write the column (column
  privileges, granted by `isolation.migrate._grant_app_role`), so only the schema owner marks them.
- `replier_presence`: open replier connections per tenant and replier process, reported by each
  replier, so that the configurator can show a tenant's live connections. A tenant table (row-level
  security, cleaned up with its tenant).
- `llm_usage_tenant_time`: the tenant's tokens since the start of its budget day, read when a replier
  seeds a budget and by the usage endpoints.
- PostgreSQL: two `SECURITY DEFINER` functions for reads across tenants, which row-level security
  would otherwise hide: `mt_tenant_controls(ids)` (status and overrides of the given tenants, for the
  replier's enforcement) and `mt_operator_tenants(account)` (the tenant list, for operators only:
  it returns nothing unless `account` is an operator).
"""

from __future__ import annotations

VERSION = 6
NAME = "per-tenant limits, suspension, operators, replier presence"

LIMIT_COLUMNS = (
    "limit_messages_per_minute",
    "limit_agent_messages_per_minute",
    "limit_connections",
    "limit_tokens_per_day",
    "limit_requests_per_minute",
)

FUNCTION_SIGNATURES = ("mt_tenant_controls(TEXT[])", "mt_operator_tenants(TEXT)")

_LIMITS_SELECT = ", ".join(f"t.{c}" for c in LIMIT_COLUMNS)
_LIMITS_RETURNS = ", ".join(f"{c} BIGINT" for c in LIMIT_COLUMNS)

FUNCTIONS = (
    f"""CREATE FUNCTION mt_tenant_controls(p_ids TEXT[])
RETURNS TABLE (id VARCHAR, status VARCHAR, {_LIMITS_RETURNS})
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT t.id, t.status, {_LIMITS_SELECT} FROM tenants t WHERE t.id = ANY(p_ids)
$$""",
    f"""CREATE FUNCTION mt_operator_tenants(p_account TEXT)
RETURNS TABLE (id VARCHAR, name VARCHAR, type VARCHAR, status VARCHAR, created_at TIMESTAMP, {_LIMITS_RETURNS})
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT t.id, t.name, t.type, t.status, t.created_at, {_LIMITS_SELECT} FROM tenants t
    WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.id = p_account AND a.is_operator)
    ORDER BY t.created_at, t.id
$$""",
)


def _statements(dialect: str) -> list[str]:
    ts = "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
    statements = [
        "ALTER TABLE accounts ADD COLUMN is_operator BOOLEAN NOT NULL DEFAULT FALSE",
        *(f"ALTER TABLE tenants ADD COLUMN {column} BIGINT CHECK ({column} >= 0)" for column in LIMIT_COLUMNS),
        f"ALTER TABLE tenants ADD COLUMN limits_updated_at {ts}",
        "CREATE INDEX llm_usage_tenant_time ON llm_usage (tenant_id, created_at)",
        f"""CREATE TABLE replier_presence (
    tenant_id VARCHAR(40) NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    process_id VARCHAR(40) NOT NULL,
    connections INTEGER NOT NULL CHECK (connections >= 0),
    updated_at {ts} NOT NULL,
    PRIMARY KEY (tenant_id, process_id)
)""",
    ]
    if dialect == "postgresql":
        statements += [
            "ALTER TABLE replier_presence ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY tenant_isolation ON replier_presence "
            "USING (tenant_id = current_setting('app.tenant_id', true)) "
            "WITH CHECK (tenant_id = current_setting('app.tenant_id', true))",
            *FUNCTIONS,
            *(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC" for signature in FUNCTION_SIGNATURES),
        ]
    return statements


def apply(conn, dialect: str, app_role: str | None) -> None:
    for statement in _statements(dialect):
        conn.execute_sql(statement)
