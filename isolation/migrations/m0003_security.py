"""Security hardening of the schema (issue: security at the edges).

Two independent parts, applied in one migration:
- sessions: what the configurator needs to revoke access tokens at logout;
- login secrets: on PostgreSQL the application role cannot read password hashes.
"""

from __future__ import annotations

VERSION = 3
NAME = "security: token sessions and protected password hashes"


def _session_statements(dialect: str) -> list[str]:
    """Refresh tokens remember the sign-in session they belong to (the `sid` claim of its tokens).

    An access token is accepted only while its session has a live refresh token, so revoking a
    session's refresh tokens (logout, reuse of a rotated token) also ends its access tokens. The
    index serves that check, which runs with the membership lookup of every authenticated request.
    Rows from before this migration have no session: tokens without `sid` are refused, so their
    holders sign in once more. Both dialects share the DDL; the row-level security policy of
    `refresh_tokens` (by tenant) covers the new column as it is.
    """
    return [
        "ALTER TABLE refresh_tokens ADD COLUMN session_id VARCHAR(64)",
        "CREATE INDEX refresh_tokens_session ON refresh_tokens (tenant_id, session_id)",
    ]


# Granted to the application role by `isolation.migrate._grant_app_role` (re-run at every upgrade),
# which also limits its SELECT on `accounts` to every column but `password_hash`.
LOGIN_FUNCTION_SIGNATURES = ("mt_login_secret(TEXT)",)


def _login_statements(dialect: str) -> list[str]:
    """PostgreSQL: the application role reads no password hash but the one of the account signing in.

    Login needs one account's hash; nothing else does. Column privileges keep `password_hash` out of
    every query the application role runs (a SQL injection or a stray `SELECT *` cannot dump them),
    and this `SECURITY DEFINER` function, running as the schema owner, returns the row of exactly one
    account whose username or email equals `p_login` (no patterns; a username match wins). SQLite has
    no roles: the file's permissions are its only wall.
    """
    if dialect != "postgresql":
        return []
    return [
        """CREATE FUNCTION mt_login_secret(p_login TEXT)
RETURNS TABLE (id VARCHAR, username VARCHAR, email VARCHAR, status VARCHAR, created_at TIMESTAMP, password_hash TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
    SELECT a.id, a.username, a.email, a.status, a.created_at, a.password_hash
    FROM accounts a
    WHERE a.username = p_login OR a.email = p_login
    ORDER BY a.username = p_login DESC, a.id
    LIMIT 1
$$""",
        "REVOKE ALL ON FUNCTION mt_login_secret(TEXT) FROM PUBLIC",
    ]


def apply(conn, dialect: str, app_role: str | None) -> None:
    for statement in _session_statements(dialect) + _login_statements(dialect):
        conn.execute_sql(statement)
