"""Scoped query managers: the only way application code reads or writes tenant tables.

`Scoped(ctx).agents.get(agent_id)` runs one statement whose WHERE clause carries every filter of the
context (tenant, and agent/platform/chat stream when the context has them and the table has the
column). Inserts take their tenant columns from the context, never from arguments. A missing row and
another tenant's row raise the same `NotFound`. Methods that need a narrower context than the one
given raise `IsolationViolationError`. Results are plain dicts, so no caller can `.save()` a model
instance around the scope.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any, ClassVar

from peewee import Case, DateTimeField, Field, IntegrityError, fn

from isolation import db as _db
from isolation.context import IsolationContext, Level
from isolation.errors import Conflict, InvalidValueError, IsolationViolationError, NotFound
from isolation.ids import (
    api_key_display_prefix,
    chat_stream_id,
    hash_api_key,
    new_api_key_secret,
    new_id,
    utcnow,
)
from isolation.models import (
    Agent,
    AgentTemplate,
    ApiKey,
    ChatStream,
    LlmUsage,
    Membership,
    Memory,
    Message,
    RefreshToken,
    Tenant,
    TenantModel,
)

MAX_PAGE = 500

ROLES = ("owner", "admin", "member")


def _page(limit: int) -> int:
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return min(limit, MAX_PAGE)


@contextmanager
def _reading(tenant_id: str) -> Iterator[None]:
    """Reads need the tenant bound on PostgreSQL (RLS); SQLite reads run as they are."""
    if not _db.is_postgres():
        yield
        return
    with _db.tenant_transaction(tenant_id):
        yield


@contextmanager
def _writing(tenant_id: str) -> Iterator[None]:
    """Writes run in a transaction (a savepoint when nested) with the tenant bound."""
    with _db.tenant_transaction(tenant_id, write=True):
        yield


def _decode_datetime(value: Any) -> Any:
    """SQLite hands back ISO text, PostgreSQL a `datetime`: both become a `datetime`."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:  # not ISO: leave it to peewee's own (slower) parser
            return DateTimeField().python_value(value)
    return value


def _decoder(field: Field):
    """What the peewee field would have returned for a raw column value (datetimes parsed faster)."""
    return _decode_datetime if isinstance(field, DateTimeField) else field.python_value


@lru_cache(maxsize=16)
def _compiled_select(model: type[TenantModel], hidden: tuple[str, ...]):
    """(column SQL, result names, decoders) of a model's public columns.

    For `memberships.get()`, which every authenticated configurator request runs: fixed SQL instead
    of a peewee query built per call (building cost several times more than running it). The scope is
    written out in the method, as `_scope()` would build it.
    """
    fields = [f for name, f in model._meta.fields.items() if name not in hidden]
    columns = ", ".join(f.column_name for f in fields)
    return columns, tuple(f.name for f in fields), tuple(_decoder(f) for f in fields)


def _rows_as_dicts(cursor, names: tuple[str, ...], decoders: tuple) -> list[dict]:
    return [
        {name: decode(value) for name, decode, value in zip(names, decoders, raw, strict=True)}
        for raw in cursor.fetchall()
    ]


@contextmanager
def _parent_must_exist(entity: str) -> Iterator[None]:
    """A composite foreign key that fails means the context names a parent outside the tenant."""
    try:
        yield
    except IntegrityError as exc:
        raise NotFound(entity) from exc


class _Manager:
    """Common scoping for one tenant table."""

    model: ClassVar[type[TenantModel]]
    entity: ClassVar[str]
    hidden: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: IsolationContext) -> None:
        if not isinstance(ctx, IsolationContext):
            raise IsolationViolationError("a scoped manager needs an IsolationContext")
        self.ctx = ctx

    # -- scoping -----------------------------------------------------------------------------
    def _scope(self):
        """The WHERE clause of the context for this table (tenant always, narrower when known)."""
        model = self.model
        clause = model.tenant_id == self.ctx.tenant_id
        fields = model._meta.fields
        if self.ctx.agent_id is not None and "agent_id" in fields:
            clause &= fields["agent_id"] == self.ctx.agent_id
        if self.ctx.platform is not None and "platform" in fields and model is not Memory:
            clause &= fields["platform"] == self.ctx.platform
        if self.ctx.chat_stream_id is not None and "chat_stream_id" in fields and model is not Memory:
            clause &= fields["chat_stream_id"] == self.ctx.chat_stream_id
        return clause

    def _columns(self):
        return [f for name, f in self.model._meta.fields.items() if name not in self.hidden]

    def _select(self, *extra):
        query = self.model.select(*self._columns()).where(self._scope())
        for condition in extra:
            query = query.where(condition)
        return query.dicts()

    def _reading(self):
        return _reading(self.ctx.tenant_id)

    def _writing(self):
        return _writing(self.ctx.tenant_id)

    def _get(self, *conditions) -> dict:
        with self._reading():
            row = self._select(*conditions).first()
        if row is None:
            raise NotFound(self.entity)
        return row

    def _pk(self, row_id: str):
        return self.model._meta.fields["id"] == row_id

    # -- generic operations (every manager with an `id` column) -----------------------------
    def get(self, row_id: str) -> dict:
        """The row with this id inside the context, or `NotFound`."""
        return self._get(self._pk(row_id))

    def delete(self, row_id: str) -> None:
        """Delete the row with this id inside the context, or raise `NotFound`."""
        with self._writing():
            deleted = self.model.delete().where(self._scope() & self._pk(row_id)).execute()
        if deleted == 0:
            raise NotFound(self.entity)

    def count(self) -> int:
        with self._reading():
            return self.model.select(fn.COUNT(1)).where(self._scope()).scalar() or 0

    def _update(self, row_id: str, values: dict) -> dict:
        with self._writing():
            changed = self.model.update(values).where(self._scope() & self._pk(row_id)).execute()
            if changed == 0:
                raise NotFound(self.entity)
            return self._get(self._pk(row_id))


class TenantManager:
    """The context's own tenant row (the `tenants` table is keyed by the tenant id itself)."""

    entity = "tenant"

    def __init__(self, ctx: IsolationContext) -> None:
        self.ctx = ctx

    def _where(self):
        return Tenant.id == self.ctx.tenant_id

    def get(self) -> dict:
        with _reading(self.ctx.tenant_id):
            row = Tenant.select().where(self._where()).dicts().first()
        if row is None:
            raise NotFound(self.entity)
        return row

    def update(self, *, name: str | None = None, settings: dict | None = None, type: str | None = None) -> dict:
        values: dict[Any, Any] = {Tenant.updated_at: utcnow()}
        if name is not None:
            values[Tenant.name] = name
        if settings is not None:
            values[Tenant.settings] = settings
        if type is not None:
            values[Tenant.type] = type
        with _writing(self.ctx.tenant_id):
            if Tenant.update(values).where(self._where()).execute() == 0:
                raise NotFound(self.entity)
            return self.get()

    def stats(self) -> dict:
        """Real counts of everything the tenant owns, read in one transaction."""
        scoped = Scoped(IsolationContext(self.ctx.tenant_id))
        with _reading(self.ctx.tenant_id):
            usage = (
                LlmUsage.select(
                    fn.COUNT(1),
                    fn.COALESCE(fn.SUM(LlmUsage.prompt_tokens), 0),
                    fn.COALESCE(fn.SUM(LlmUsage.completion_tokens), 0),
                    fn.COALESCE(fn.SUM(Case(None, [(LlmUsage.outcome == "error", 1)], 0)), 0),
                )
                .where(LlmUsage.tenant_id == self.ctx.tenant_id)
                .tuples()
                .first()
            )
            return {
                "agents": scoped.agents.count(),
                "api_keys": scoped.api_keys.count(),
                "active_api_keys": scoped.api_keys.count(status="active"),
                "members": scoped.memberships.count(),
                "chat_streams": scoped.chat_streams.count(),
                "messages": scoped.messages.count(),
                "memories": scoped.memories.count(),
                "llm_calls": int(usage[0]),
                "llm_prompt_tokens": int(usage[1]),
                "llm_completion_tokens": int(usage[2]),
                "llm_errors": int(usage[3]),
            }


class MembershipManager(_Manager):
    model = Membership
    entity = "membership"

    def _pk(self, row_id: str):
        return Membership.account_id == row_id

    def get(self, account_id: str) -> dict:
        """The account's membership in the context's tenant, or `NotFound`.

        Every authenticated configurator request checks its membership, so this is one precompiled
        statement (see `_compiled_select`) with the scope of `_scope()` (the tenant) plus the account.
        """
        columns, names, decoders = _compiled_select(Membership, self.hidden)
        p = _db.database.param
        sql = f"SELECT {columns} FROM {Membership._meta.table_name} WHERE tenant_id = {p} AND account_id = {p}"
        with self._reading():
            params = (self.ctx.tenant_id, Membership.account_id.db_value(account_id))  # NUL refused, as elsewhere
            rows = _rows_as_dicts(_db.database.execute_sql(sql, params), names, decoders)
        if not rows:
            raise NotFound(self.entity)
        return rows[0]

    def get_with_session(self, account_id: str, session_id: str) -> dict:
        """`get(account_id)` plus `session_active`: whether the sign-in session `session_id` of the
        account still has a refresh token that is neither revoked nor expired.

        One statement (the session check is an EXISTS inside the membership lookup), so checking that
        an access token was not logged out costs no extra round trip on the hot path.
        """
        columns, names, decoders = _compiled_select(Membership, self.hidden)
        p = _db.database.param
        sql = (
            f"SELECT {columns}, EXISTS (SELECT 1 FROM {RefreshToken._meta.table_name} r "
            f"WHERE r.tenant_id = m.tenant_id AND r.session_id = {p} AND r.account_id = m.account_id "
            f"AND r.revoked_at IS NULL AND r.expires_at > {p}) "
            f"FROM {Membership._meta.table_name} m WHERE m.tenant_id = {p} AND m.account_id = {p}"
        )
        params = (
            RefreshToken.session_id.db_value(session_id),
            RefreshToken.expires_at.db_value(utcnow()),
            self.ctx.tenant_id,
            Membership.account_id.db_value(account_id),
        )
        with self._reading():
            row = _db.database.execute_sql(sql, params).fetchone()
        if row is None:
            raise NotFound(self.entity)
        found = {name: decode(value) for name, decode, value in zip(names, decoders, row, strict=False)}
        found["session_active"] = bool(row[-1])
        return found

    def add(self, account_id: str, role: str) -> dict:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        try:
            with self._writing():
                Membership.insert(
                    tenant_id=self.ctx.tenant_id, account_id=account_id, role=role, created_at=utcnow()
                ).execute()
        except IntegrityError as exc:
            raise Conflict(self.entity, "account is already a member of this tenant") from exc
        return self.get(account_id)

    def list(self, limit: int = 100, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(Membership.created_at, Membership.account_id)
            return list(query.limit(_page(limit)).offset(offset))

    def set_role(self, account_id: str, role: str) -> dict:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        return self._update(account_id, {Membership.role: role})


class RefreshTokenManager(_Manager):
    model = RefreshToken
    entity = "refresh token"

    def _pk(self, row_id: str):
        return RefreshToken.jti == row_id

    def issue(self, jti: str, account_id: str, expires_at: datetime, *, session_id: str | None = None) -> dict:
        with _parent_must_exist("membership"), self._writing():
            RefreshToken.insert(
                tenant_id=self.ctx.tenant_id,
                jti=jti,
                account_id=account_id,
                expires_at=expires_at,
                created_at=utcnow(),
                session_id=session_id,
            ).execute()
        return self.get(jti)

    def rotate(
        self, jti: str, account_id: str, new_jti: str, expires_at: datetime, *, session_id: str | None = None
    ) -> dict:
        """Revoke `jti` and issue `new_jti` (of the same session) in one transaction.

        Raises `NotFound` when `jti` is unknown, expired, already used or (with `session_id`) of
        another session. Reuse of a rotated token revokes every token of the account (a stolen
        refresh token stops working for everyone).
        """
        now = utcnow()
        condition = (
            self._scope()
            & (RefreshToken.jti == jti)
            & (RefreshToken.account_id == account_id)
            & RefreshToken.revoked_at.is_null()
            & (RefreshToken.expires_at > now)
        )
        if session_id is not None:
            condition &= RefreshToken.session_id == session_id
        with self._writing():
            used = RefreshToken.update(revoked_at=now, replaced_by=new_jti).where(condition).execute()
            if used:
                RefreshToken.insert(
                    tenant_id=self.ctx.tenant_id,
                    jti=new_jti,
                    account_id=account_id,
                    expires_at=expires_at,
                    created_at=now,
                    session_id=session_id,
                ).execute()
        if used:
            return self.get(new_jti)
        reused = self._get_or_none(RefreshToken.jti == jti)
        if reused is not None and reused["replaced_by"] is not None:
            # Committed on its own: the NotFound below must not roll the revocation back.
            self.revoke_all(account_id)
        raise NotFound(self.entity)

    def _get_or_none(self, *conditions) -> dict | None:
        try:
            return self._get(*conditions)
        except NotFound:
            return None

    def is_active(self, jti: str, account_id: str) -> bool:
        with self._reading():
            return (
                RefreshToken.select(RefreshToken.jti)
                .where(
                    self._scope()
                    & (RefreshToken.jti == jti)
                    & (RefreshToken.account_id == account_id)
                    & RefreshToken.revoked_at.is_null()
                    & (RefreshToken.expires_at > utcnow())
                )
                .exists()
            )

    def revoke(self, jti: str) -> None:
        self._update(jti, {RefreshToken.revoked_at: utcnow()})

    def revoke_session(self, session_id: str) -> int:
        """Revoke every refresh token of one sign-in session (its access tokens stop working too)."""
        with self._writing():
            return (
                RefreshToken.update(revoked_at=utcnow())
                .where(self._scope() & (RefreshToken.session_id == session_id) & RefreshToken.revoked_at.is_null())
                .execute()
            )

    def revoke_all(self, account_id: str) -> int:
        with self._writing():
            return (
                RefreshToken.update(revoked_at=utcnow())
                .where(self._scope() & (RefreshToken.account_id == account_id) & RefreshToken.revoked_at.is_null())
                .execute()
            )


AGENT_STATUSES = ("active", "disabled")


def _check_agent_fields(status: str | None, template_id: str | None) -> None:
    """Refuse values the schema's constraints would reject, so an IntegrityError means a name clash."""
    if status is not None and status not in AGENT_STATUSES:
        raise InvalidValueError(f"agent status must be one of {AGENT_STATUSES}")
    if template_id is not None and not AgentTemplate.select().where(AgentTemplate.id == template_id).exists():
        raise NotFound("agent template")


def _agent_json_object(quote: str, timestamp: str, flag: str) -> str:
    """SQL that writes an agent row as the API's agent object (`AgentOut`), as text.

    The JSON columns hold JSON text written by `JSONField` (always valid, compact), so they are
    spliced in as they are instead of being parsed again; every other value goes through the
    dialect's JSON quoting. `quote`, `timestamp` are templates with `{column}`.
    """
    pairs = [
        ("id", quote.format(column="id")),
        ("name", quote.format(column="name")),
        ("description", quote.format(column="description")),
        ("template_id", f"coalesce({quote.format(column='template_id')}, 'null')"),
        ("persona", "persona"),
        ("config", "config"),
        ("llm", "llm"),
        ("has_api_key", flag),
        ("status", quote.format(column="status")),
        ("version", "CAST(version AS TEXT)"),
        ("created_at", timestamp.format(column="created_at")),
        ("updated_at", timestamp.format(column="updated_at")),
    ]
    parts = [f"'{',' if i else '{'}\"{key}\":' || {value}" for i, (key, value) in enumerate(pairs)]
    return " || ".join(parts) + " || '}'"


# `{scope}` and `{p}` are filled in per call. SQLite keeps a subquery's order in group_concat
# (3.44 would allow ORDER BY inside the aggregate; Python's bundled SQLite may be older), PostgreSQL
# orders inside string_agg. Stored timestamps are naive UTC; SQLite keeps them as the text
# "YYYY-MM-DD HH:MM:SS[.ffffff]".
_AGENT_PAGE_SQL = {
    "sqlite": (
        "SELECT (SELECT '[' || coalesce(group_concat(j, ','), '') || ']' FROM (SELECT "
        + _agent_json_object(
            "json_quote({column})",
            "'\"' || replace({column}, ' ', 'T') || 'Z\"'",
            "CASE WHEN llm_secret IS NULL THEN 'false' ELSE 'true' END",
        )
        + " AS j FROM agents WHERE {scope} ORDER BY created_at, id LIMIT {p} OFFSET {p})), "
        "EXISTS (SELECT 1 FROM agents WHERE {scope} ORDER BY created_at, id LIMIT 1 OFFSET {p})"
    ),
    "postgresql": (
        "SELECT (SELECT '[' || coalesce(string_agg(j, ',' ORDER BY created_at, id), '') || ']' FROM (SELECT "
        "created_at, id, "
        + _agent_json_object(
            "to_json({column})::text",
            """'"' || to_char({column}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'""",
            "CASE WHEN llm_secret IS NULL THEN 'false' ELSE 'true' END",
        )
        + " AS j FROM agents WHERE {scope} ORDER BY created_at, id LIMIT {p} OFFSET {p}) page), "
        "EXISTS (SELECT 1 FROM agents WHERE {scope} ORDER BY created_at, id LIMIT 1 OFFSET {p})"
    ),
}


@lru_cache(maxsize=8)
def _agent_page_sql(postgres: bool, p: str, *, by_agent: bool) -> str:
    """`_AGENT_PAGE_SQL` with the scope (the tenant, and the agent when the context names one)."""
    scope = f"tenant_id = {p}" + (f" AND id = {p}" if by_agent else "")
    template = _AGENT_PAGE_SQL["postgresql" if postgres else "sqlite"]
    return template.replace("{scope}", scope).replace("{p}", p)


class AgentManager(_Manager):
    model = Agent
    entity = "agent"
    hidden = ("llm_secret",)

    def _scope(self):
        clause = Agent.tenant_id == self.ctx.tenant_id
        if self.ctx.agent_id is not None:
            clause &= Agent.id == self.ctx.agent_id
        return clause

    def create(
        self,
        *,
        name: str,
        persona: dict,
        config: dict,
        llm: dict,
        description: str = "",
        template_id: str | None = None,
        llm_secret: str | None = None,
        status: str = "active",
    ) -> dict:
        _check_agent_fields(status, template_id)
        agent_id = new_id("agt")
        now = utcnow()
        try:
            with self._writing():
                Agent.insert(
                    tenant_id=self.ctx.tenant_id,
                    id=agent_id,
                    name=name,
                    description=description,
                    template_id=template_id,
                    persona=persona,
                    config=config,
                    llm=llm,
                    llm_secret=llm_secret,
                    status=status,
                    version=1,
                    created_at=now,
                    updated_at=now,
                ).execute()
        except IntegrityError as exc:
            raise Conflict(self.entity, f"an agent named {name!r} already exists") from exc
        return self.get(agent_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(Agent.created_at, Agent.id).limit(_page(limit)).offset(offset)
            return list(query)

    def update(self, agent_id: str, **fields: Any) -> dict:
        """Change the given fields and bump `version` so the replier reloads the agent."""
        allowed = {"name", "description", "persona", "config", "llm", "llm_secret", "status", "template_id"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        _check_agent_fields(fields.get("status"), fields.get("template_id"))
        values: dict[Any, Any] = {Agent._meta.fields[k]: v for k, v in fields.items()}
        values[Agent.version] = Agent.version + 1
        values[Agent.updated_at] = utcnow()
        try:
            return self._update(agent_id, values)
        except IntegrityError as exc:  # status and template were checked: only the name can clash
            raise Conflict(self.entity, f"an agent named {fields.get('name')!r} already exists") from exc

    def llm_secret(self, agent_id: str) -> str | None:
        """The stored (encrypted) provider key; kept out of every other result."""
        with self._reading():
            row = Agent.select(Agent.llm_secret).where(self._scope() & (Agent.id == agent_id)).tuples().first()
        if row is None:
            raise NotFound(self.entity)
        return row[0]

    def list_with_key_flags(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """`list()` plus `has_llm_key` (whether a provider key is stored), in one query; the key stays hidden.

        Built by peewee like the other reads; `page_json()` is the same page written as JSON by the
        database, and the tests hold the two against each other.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        with self._reading():
            query = (
                Agent.select(*self._columns(), Agent.llm_secret.is_null(False).alias("has_llm_key"))
                .where(self._scope())
                .order_by(Agent.created_at, Agent.id)
                .limit(_page(limit))
                .offset(offset)
                .dicts()
            )
            rows = list(query)
        for row in rows:
            row["has_llm_key"] = bool(row["has_llm_key"])
        return rows

    def page_json(self, limit: int = 50, offset: int = 0) -> tuple[str, bool]:
        """A page of `list_with_key_flags()` as a JSON array built by the database, and whether more follow.

        Each element has the public columns, with `has_api_key` for `has_llm_key` and timestamps as
        ISO 8601 UTC text ("...Z"); the JSON columns are embedded as stored. One statement, one row:
        the configurator's `GET /agents` sends the text on unchanged, so no row is decoded into Python
        and re-encoded (PostgREST builds its responses the same way). `test_page_json_*` checks it
        against `list_with_key_flags()` on both databases.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        limit = _page(limit)
        params = [self.ctx.tenant_id] if self.ctx.agent_id is None else [self.ctx.tenant_id, self.ctx.agent_id]
        sql = _agent_page_sql(_db.is_postgres(), _db.database.param, by_agent=self.ctx.agent_id is not None)
        with self._reading():
            items, more = _db.database.execute_sql(sql, (*params, limit, offset, *params, offset + limit)).fetchone()
        return items or "[]", bool(more)

    def version(self, agent_id: str) -> int:
        """The agent's version: a cheap check for caches."""
        with self._reading():
            row = Agent.select(Agent.version).where(self._scope() & (Agent.id == agent_id)).tuples().first()
        if row is None:
            raise NotFound(self.entity)
        return row[0]

    def delete(self, agent_id: str) -> dict[str, int]:
        """Delete the agent and everything below it; returns rows deleted per table."""
        with self._writing():
            self.get(agent_id)
            agent_ctx = self.ctx.child(agent_id=agent_id) if self.ctx.agent_id is None else self.ctx
            counts: dict[str, int] = {}
            for model in (LlmUsage, Memory, Message, ChatStream, ApiKey):
                counts[model._meta.table_name] = (
                    model.delete()
                    .where((model.tenant_id == agent_ctx.tenant_id) & (model.agent_id == agent_ctx.agent_id))
                    .execute()
                )
            counts["agents"] = Agent.delete().where(self._scope() & (Agent.id == agent_id)).execute()
        return counts


class ApiKeyManager(_Manager):
    model = ApiKey
    entity = "api key"
    hidden = ("key_hash",)

    def create(
        self,
        agent_id: str,
        *,
        name: str,
        permissions: Sequence[str] = ("chat",),
        expires_at: datetime | None = None,
    ) -> tuple[dict, str]:
        """Create a key for one of the tenant's agents; returns (row, secret). The secret is not stored."""
        # NotFound for a foreign or missing agent, and for a sibling when the context names an agent
        # (the agents manager filters by the context's agent id too).
        Scoped(self.ctx).agents.get(agent_id)
        secret = new_api_key_secret()
        key_id = new_id("key")
        with self._writing():
            ApiKey.insert(
                tenant_id=self.ctx.tenant_id,
                id=key_id,
                agent_id=agent_id,
                name=name,
                key_hash=hash_api_key(secret),
                prefix=api_key_display_prefix(secret),
                permissions=list(permissions),
                status="active",
                expires_at=expires_at,
                created_at=utcnow(),
            ).execute()
        return self.get(key_id), secret

    def list(self, agent_id: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select()
            if agent_id is not None:
                query = query.where(ApiKey.agent_id == agent_id)
            return list(query.order_by(ApiKey.created_at, ApiKey.id).limit(_page(limit)).offset(offset))

    def count(self, status: str | None = None) -> int:
        with self._reading():
            query = ApiKey.select(fn.COUNT(1)).where(self._scope())
            if status is not None:
                query = query.where(ApiKey.status == status)
            return query.scalar() or 0

    def revoke(self, key_id: str) -> dict:
        now = utcnow()
        with self._writing():
            row = self.get(key_id)
            if row["status"] == "revoked":
                return row
            return self._update(key_id, {ApiKey.status: "revoked", ApiKey.revoked_at: now})

    def statuses(self, key_ids: Sequence[str]) -> dict[str, dict]:
        """Status and expiry of several keys at once (the replier re-checks open connections)."""
        if not key_ids:
            return {}
        with self._reading():
            rows = (
                ApiKey.select(ApiKey.id, ApiKey.status, ApiKey.expires_at)
                .where(self._scope() & ApiKey.id.in_(list(key_ids)))
                .dicts()
            )
            return {row["id"]: row for row in rows}

    def record_use(self, key_id: str, uses: int = 1) -> None:
        """Bump usage counters (batched by callers; a missing key is ignored: it was deleted)."""
        with self._writing():
            ApiKey.update(usage_count=ApiKey.usage_count + uses, last_used_at=utcnow()).where(
                self._scope() & (ApiKey.id == key_id)
            ).execute()


class ChatStreamManager(_Manager):
    model = ChatStream
    entity = "chat stream"

    def _scope(self):
        clause = ChatStream.tenant_id == self.ctx.tenant_id
        if self.ctx.agent_id is not None:
            clause &= ChatStream.agent_id == self.ctx.agent_id
        if self.ctx.platform is not None:
            clause &= ChatStream.platform == self.ctx.platform
        if self.ctx.chat_stream_id is not None:
            clause &= ChatStream.id == self.ctx.chat_stream_id
        return clause

    def stream_id_for(self, kind: str, peer_id: str) -> str:
        """The id of this context's stream with a group or a user (no database access)."""
        self.ctx.require(Level.TAP)
        return chat_stream_id(self.ctx.tenant_id, self.ctx.agent_id, self.ctx.platform, kind, peer_id)

    def get_or_create(
        self,
        *,
        group_id: str | None = None,
        user_id: str | None = None,
        group_name: str | None = None,
    ) -> dict:
        """The stream of a group (when `group_id`) or a private chat with `user_id`; created once."""
        self.ctx.require(Level.TAP)
        if group_id:
            kind, peer = "group", group_id
        elif user_id:
            kind, peer = "private", user_id
        else:
            raise ValueError("a chat stream needs a group_id or a user_id")
        stream_id = self.stream_id_for(kind, peer)
        now = utcnow()
        with _parent_must_exist("agent"), self._writing():
            ChatStream.insert(
                tenant_id=self.ctx.tenant_id,
                id=stream_id,
                agent_id=self.ctx.agent_id,
                platform=self.ctx.platform,
                kind=kind,
                group_id=group_id if kind == "group" else None,
                user_id=user_id if kind == "private" else None,
                group_name=group_name,
                created_at=now,
                last_active_at=now,
            ).on_conflict_ignore().execute()
            return self._get(ChatStream.id == stream_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(ChatStream.last_active_at.desc(), ChatStream.id)
            return list(query.limit(_page(limit)).offset(offset))

    def touch(self, stream_id: str, when: datetime | None = None) -> None:
        with self._writing():
            ChatStream.update(last_active_at=when or utcnow()).where(
                self._scope() & (ChatStream.id == stream_id)
            ).execute()

    def context_for(self, stream_id: str) -> IsolationContext:
        """The T+A+C+P context of one of this context's streams (NotFound for foreign ids)."""
        row = self.get(stream_id)
        return IsolationContext(self.ctx.tenant_id, row["agent_id"], row["platform"], row["id"])


class MessageManager(_Manager):
    model = Message
    entity = "message"

    def add(
        self,
        *,
        message_id: str,
        direction: str,
        text: str,
        segments: Any,
        sender_user_id: str | None = None,
        sender_nickname: str | None = None,
        reply_to: str | None = None,
        created_at: datetime | None = None,
    ) -> tuple[dict, bool]:
        """Store a message of this chat stream; returns (row, created). Replays return the stored row."""
        self.ctx.require(Level.TACP)
        if direction not in ("in", "out"):
            raise ValueError("direction must be 'in' or 'out'")
        row_id = new_id("msg")
        with _parent_must_exist("chat stream"), self._writing():
            inserted = (
                Message.insert(
                    tenant_id=self.ctx.tenant_id,
                    id=row_id,
                    agent_id=self.ctx.agent_id,
                    platform=self.ctx.platform,
                    chat_stream_id=self.ctx.chat_stream_id,
                    message_id=message_id,
                    direction=direction,
                    sender_user_id=sender_user_id,
                    sender_nickname=sender_nickname,
                    text=text,
                    segments=segments,
                    reply_to=reply_to,
                    created_at=created_at or utcnow(),
                )
                .on_conflict_ignore()
                .execute()
            )
            row = self._get(Message.message_id == message_id)
        return row, bool(inserted) and row["id"] == row_id

    def history(self, limit: int = 20, before: datetime | None = None) -> list[dict]:
        """The last `limit` messages of this chat stream, oldest first."""
        self.ctx.require(Level.TACP)
        with self._reading():
            query = self._select()
            if before is not None:
                query = query.where(Message.created_at < before)
            rows = list(query.order_by(Message.created_at.desc(), Message.id.desc()).limit(_page(limit)))
        rows.reverse()
        return rows

    def page(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Messages of this chat stream, newest first, for paginated listings."""
        self.ctx.require(Level.TACP)
        with self._reading():
            query = self._select().order_by(Message.created_at.desc(), Message.id.desc())
            return list(query.limit(_page(limit)).offset(offset))

    def by_message_id(self, message_id: str) -> dict:
        self.ctx.require(Level.TACP)
        return self._get(Message.message_id == message_id)


class MemoryManager(_Manager):
    model = Memory
    entity = "memory"

    def add(self, content: str, *, level: str | None = None, source: str = "api") -> dict:
        """Store a memory at `level` (default: the narrowest the context allows)."""
        level = level or {Level.TA: "agent", Level.TAP: "platform", Level.TACP: "chat"}.get(self.ctx.level, "agent")
        need = {"agent": Level.TA, "platform": Level.TAP, "chat": Level.TACP}.get(level)
        if need is None:
            raise ValueError("level must be agent, platform or chat")
        self.ctx.require(need)
        row_id = new_id("mem")
        with _parent_must_exist("agent or chat stream"), self._writing():
            Memory.insert(
                tenant_id=self.ctx.tenant_id,
                id=row_id,
                agent_id=self.ctx.agent_id,
                level=level,
                platform=self.ctx.platform if level in ("platform", "chat") else None,
                chat_stream_id=self.ctx.chat_stream_id if level == "chat" else None,
                content=content,
                source=source,
                created_at=utcnow(),
            ).execute()
        return self.get(row_id)

    def _scope(self):
        clause = Memory.tenant_id == self.ctx.tenant_id
        if self.ctx.agent_id is not None:
            clause &= Memory.agent_id == self.ctx.agent_id
        # A platform or chat context sees the agent-wide memories plus its own platform/chat ones.
        if self.ctx.platform is not None:
            clause &= Memory.platform.is_null() | (Memory.platform == self.ctx.platform)
        if self.ctx.chat_stream_id is not None:
            clause &= Memory.chat_stream_id.is_null() | (Memory.chat_stream_id == self.ctx.chat_stream_id)
        return clause

    def list(self, level: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select()
            if level is not None:
                query = query.where(Memory.level == level)
            return list(query.order_by(Memory.created_at.desc(), Memory.id).limit(_page(limit)).offset(offset))

    def relevant(self, limit: int = 20) -> list[dict]:
        """Memories for a reply in this chat: agent-wide, this platform's and this chat's, newest first."""
        self.ctx.require(Level.TACP)
        return self.list(limit=limit)

    def update(self, memory_id: str, content: str) -> dict:
        return self._update(memory_id, {Memory.content: content})

    def delete_all(self) -> int:
        """Delete every memory the context sees (e.g. all of one agent's)."""
        with self._writing():
            return Memory.delete().where(self._scope()).execute()


class LlmUsageManager(_Manager):
    model = LlmUsage
    entity = "llm usage"

    def record(
        self,
        *,
        provider: str,
        model: str,
        outcome: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_ms: int = 0,
        error: str | None = None,
    ) -> dict:
        self.ctx.require(Level.TAP)
        row_id = new_id("use")
        with _parent_must_exist("agent or chat stream"), self._writing():
            LlmUsage.insert(
                tenant_id=self.ctx.tenant_id,
                id=row_id,
                agent_id=self.ctx.agent_id,
                platform=self.ctx.platform,
                chat_stream_id=self.ctx.chat_stream_id,
                provider=provider,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                outcome=outcome,
                error=error,
                created_at=utcnow(),
            ).execute()
        return self.get(row_id)

    def list(self, limit: int = 50, offset: int = 0) -> list[dict]:
        with self._reading():
            query = self._select().order_by(LlmUsage.created_at.desc(), LlmUsage.id)
            return list(query.limit(_page(limit)).offset(offset))


class Scoped:
    """Entry point: `Scoped(ctx).agents`, `.api_keys`, `.messages`, … all bound to `ctx`."""

    def __init__(self, ctx: IsolationContext) -> None:
        if not isinstance(ctx, IsolationContext):
            raise IsolationViolationError("Scoped needs an IsolationContext")
        self.ctx = ctx

    @cached_property
    def tenant(self) -> TenantManager:
        return TenantManager(self.ctx)

    @cached_property
    def memberships(self) -> MembershipManager:
        return MembershipManager(self.ctx)

    @cached_property
    def refresh_tokens(self) -> RefreshTokenManager:
        return RefreshTokenManager(self.ctx)

    @cached_property
    def agents(self) -> AgentManager:
        return AgentManager(self.ctx)

    @cached_property
    def api_keys(self) -> ApiKeyManager:
        return ApiKeyManager(self.ctx)

    @cached_property
    def chat_streams(self) -> ChatStreamManager:
        return ChatStreamManager(self.ctx)

    @cached_property
    def messages(self) -> MessageManager:
        return MessageManager(self.ctx)

    @cached_property
    def memories(self) -> MemoryManager:
        return MemoryManager(self.ctx)

    @cached_property
    def llm_usage(self) -> LlmUsageManager:
        return LlmUsageManager(self.ctx)
