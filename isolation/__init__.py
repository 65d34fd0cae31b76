"""MaiTenant's isolation library: context, scoped managers, schema, migrations and cleanup.

Application code imports from here (or `isolation.system`, `isolation.cleanup`, `isolation.fastpath`),
never `isolation.models`: a test fails when a module outside this package touches a model. Its
database work runs in `isolation.db.connection()` and `isolation.db.unit_of_work(tenant, write=...)`,
the one connection and transaction policy of every service.
"""

from isolation.context import IsolationContext, Level, current_context, use_context
from isolation.errors import (
    Conflict,
    InvalidContextError,
    InvalidValueError,
    IsolationError,
    IsolationViolationError,
    NotFound,
    SchemaVersionError,
)
from isolation.scoped import Scoped

__all__ = [
    "Conflict",
    "InvalidContextError",
    "InvalidValueError",
    "IsolationContext",
    "IsolationError",
    "IsolationViolationError",
    "Level",
    "NotFound",
    "SchemaVersionError",
    "Scoped",
    "current_context",
    "use_context",
]
