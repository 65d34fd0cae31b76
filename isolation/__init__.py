"""MaiTenant's isolation library: context, scoped managers, schema, migrations and cleanup.

Application code imports from here (or `isolation.scoped`, `isolation.system`, `isolation.cleanup`),
never `isolation.models`: a test fails when a module outside this package touches a model.
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
