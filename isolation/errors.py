"""Errors raised by the isolation layer.

`NotFound` is deliberately the same for "no such row" and "row of another tenant": callers map it
to 404 and can never learn whether a foreign id exists.
"""


class IsolationError(Exception):
    """Base class of every error this package raises."""


class NotFound(IsolationError):
    """The row does not exist in the current isolation context (missing or foreign alike)."""

    def __init__(self, entity: str, entity_id: object = None) -> None:
        self.entity = entity
        self.entity_id = entity_id
        super().__init__(f"{entity} not found")


class IsolationViolationError(IsolationError):
    """The operation needs a narrower context than the one given (e.g. chat history at T level)."""


class InvalidContextError(IsolationError, ValueError):
    """An `IsolationContext` was built from empty or inconsistent ids."""


class Conflict(IsolationError):
    """A uniqueness rule of the tenant's data was broken (e.g. a duplicate agent name)."""

    def __init__(self, entity: str, message: str) -> None:
        self.entity = entity
        super().__init__(message)


class SchemaVersionError(IsolationError):
    """The database schema is older or newer than this code knows; the backend must not start."""


class InvalidValueError(IsolationError, ValueError):
    """A value cannot be stored as given (e.g. text with NUL characters, which PostgreSQL refuses).

    Raised on both databases alike, before anything is written, so behaviour never depends on the
    backend. APIs map it to 422 / an error reply.
    """
