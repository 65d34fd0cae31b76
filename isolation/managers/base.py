"""What every scoped manager shares: the context's WHERE clause, paging, and the unit of work.

A manager is bound to one `IsolationContext`. Its reads and writes run in
`isolation.db.unit_of_work(tenant)` (the one transaction policy: the tenant bound on PostgreSQL, a
write transaction or savepoint for writes), its WHERE clause carries every filter of the context the
table has a column for, and it returns plain dicts, so no caller can `.save()` a model instance
around the scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import ClassVar

from peewee import IntegrityError, fn

from isolation.context import IsolationContext
from isolation.db import unit_of_work
from isolation.errors import IsolationViolationError, NotFound
from isolation.models import TenantModel

MAX_PAGE = 500


def page_size(limit: int) -> int:
    """`limit`, capped at `MAX_PAGE`; `ValueError` below 1."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return min(limit, MAX_PAGE)


@contextmanager
def parent_must_exist(entity: str) -> Iterator[None]:
    """A composite foreign key that fails means the context names a parent outside the tenant."""
    try:
        yield
    except IntegrityError as exc:
        raise NotFound(entity) from exc


class TableManager:
    """Scoped access to one tenant table with an `id` column (subclasses set `model`, `entity`)."""

    model: ClassVar[type[TenantModel]]
    entity: ClassVar[str]
    hidden: ClassVar[tuple[str, ...]] = ()  # columns no result shows
    # The column that holds each id of the context, where the table has it (an agent's own id is
    # `agents.id`, a chat stream's is `chat_streams.id`).
    scope_columns: ClassVar[dict[str, str]] = {
        "agent_id": "agent_id",
        "platform": "platform",
        "chat_stream_id": "chat_stream_id",
    }

    def __init__(self, ctx: IsolationContext) -> None:
        if not isinstance(ctx, IsolationContext):
            raise IsolationViolationError("a scoped manager needs an IsolationContext")
        self.ctx = ctx

    # -- scoping -----------------------------------------------------------------------------
    def _scope(self):
        """The WHERE clause of the context for this table (tenant always, narrower when known).

        Memories, visible at several levels, override it.
        """
        clause = self.model.tenant_id == self.ctx.tenant_id
        fields = self.model._meta.fields
        for attribute, column in self.scope_columns.items():
            value = getattr(self.ctx, attribute)
            if value is not None and column in fields:
                clause &= fields[column] == value
        return clause

    def _columns(self):
        return [f for name, f in self.model._meta.fields.items() if name not in self.hidden]

    def _select(self, *extra):
        query = self.model.select(*self._columns()).where(self._scope())
        for condition in extra:
            query = query.where(condition)
        return query.dicts()

    def _reading(self) -> AbstractContextManager[None]:
        return unit_of_work(self.ctx.tenant_id)

    def _writing(self) -> AbstractContextManager[None]:
        return unit_of_work(self.ctx.tenant_id, write=True)

    def _get(self, *conditions) -> dict:
        with self._reading():
            row = self._select(*conditions).first()
        if row is None:
            raise NotFound(self.entity)
        return row

    def _insert(self, **values):
        """An INSERT into this table whose tenant column comes from the context, never from arguments."""
        return self.model.insert(tenant_id=self.ctx.tenant_id, **values)

    def _pk(self, row_id: str):
        return self.model._meta.fields["id"] == row_id

    # -- generic operations ------------------------------------------------------------------
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
