"""A tenant's agents (with the configurator's agents page) and the API keys the replier accepts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from peewee import IntegrityError, fn

from isolation.errors import Conflict, InvalidValueError, NotFound
from isolation.ids import api_key_display_prefix, hash_api_key, new_api_key_secret, new_id, utcnow
from isolation.managers import sql
from isolation.managers.base import TableManager, page_size
from isolation.models import Agent, AgentTemplate, ApiKey, ChatStream, LlmUsage, Memory, Message

AGENT_STATUSES = ("active", "disabled")


def _check_agent_fields(status: str | None, template_id: str | None) -> None:
    """Refuse values the schema's constraints would reject, so an IntegrityError means a name clash."""
    if status is not None and status not in AGENT_STATUSES:
        raise InvalidValueError(f"agent status must be one of {AGENT_STATUSES}")
    if template_id is not None and not AgentTemplate.select().where(AgentTemplate.id == template_id).exists():
        raise NotFound("agent template")


class AgentManager(TableManager):
    model = Agent
    entity = "agent"
    hidden = ("encrypted_api_key",)
    scope_columns = {"agent_id": "id"}

    def create(
        self,
        *,
        name: str,
        persona: dict,
        config: dict,
        llm: dict,
        description: str = "",
        template_id: str | None = None,
        encrypted_api_key: str | None = None,
        status: str = "active",
    ) -> dict:
        _check_agent_fields(status, template_id)
        agent_id = new_id("agt")
        now = utcnow()
        try:
            with self._writing():
                self._insert(
                    id=agent_id,
                    name=name,
                    description=description,
                    template_id=template_id,
                    persona=persona,
                    config=config,
                    llm=llm,
                    encrypted_api_key=encrypted_api_key,
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
            query = self._select().order_by(Agent.created_at, Agent.id).limit(page_size(limit)).offset(offset)
            return list(query)

    def update(self, agent_id: str, **fields: Any) -> dict:
        """Change the given fields and bump `version` so the replier reloads the agent."""
        allowed = {"name", "description", "persona", "config", "llm", "encrypted_api_key", "status", "template_id"}
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

    def _column(self, column, agent_id: str):
        """One column of one of the context's agents, or `NotFound`."""
        with self._reading():
            row = Agent.select(column).where(self._scope() & (Agent.id == agent_id)).tuples().first()
        if row is None:
            raise NotFound(self.entity)
        return row[0]

    def encrypted_api_key(self, agent_id: str) -> str | None:
        """The stored (encrypted) provider key; kept out of every other result."""
        return self._column(Agent.encrypted_api_key, agent_id)

    def version(self, agent_id: str) -> int:
        """The agent's version: a cheap check for caches."""
        return self._column(Agent.version, agent_id)

    def list_with_key_flags(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """`list()` plus `has_api_key` (whether an LLM key is stored), in one query; the key stays hidden.

        Built by peewee like the other reads; `page_json()` is the same page written as JSON by the
        database, and the tests hold the two against each other.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        with self._reading():
            query = (
                Agent.select(*self._columns(), Agent.encrypted_api_key.is_null(False).alias("has_api_key"))
                .where(self._scope())
                .order_by(Agent.created_at, Agent.id)
                .limit(page_size(limit))
                .offset(offset)
                .dicts()
            )
            rows = list(query)
        for row in rows:
            row["has_api_key"] = bool(row["has_api_key"])
        return rows

    def page_json(self, limit: int = 50, offset: int = 0) -> tuple[str, bool]:
        """A page of `list_with_key_flags()` as a JSON array built by the database, and whether more follow.

        Each element has the public columns, `has_api_key`, and timestamps as
        ISO 8601 UTC text ("...Z"); the JSON columns are embedded as stored. One statement, one row
        (`sql.agent_page`): the configurator's `GET /agents` sends the text on unchanged, so no row is
        decoded into Python and re-encoded (PostgREST builds its responses the same way).
        `test_page_json_*` checks it against `list_with_key_flags()` on both databases.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        with self._reading():
            return sql.agent_page(self.ctx.tenant_id, self.ctx.agent_id, page_size(limit), offset)

    def delete(self, agent_id: str) -> dict[str, int]:
        """Delete the agent and everything below it; returns rows deleted per table."""
        with self._writing():
            self.get(agent_id)  # NotFound for a foreign agent, or a sibling of the context's agent
            counts: dict[str, int] = {}
            for model in (LlmUsage, Memory, Message, ChatStream, ApiKey):
                counts[model._meta.table_name] = (
                    model.delete()
                    .where((model.tenant_id == self.ctx.tenant_id) & (model.agent_id == agent_id))
                    .execute()
                )
            counts["agents"] = Agent.delete().where(self._scope() & (Agent.id == agent_id)).execute()
        return counts


class ApiKeyManager(TableManager):
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
        AgentManager(self.ctx).get(agent_id)
        secret = new_api_key_secret()
        key_id = new_id("key")
        with self._writing():
            self._insert(
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
            return list(query.order_by(ApiKey.created_at, ApiKey.id).limit(page_size(limit)).offset(offset))

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
