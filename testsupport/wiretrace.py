"""Count what a PostgreSQL connection sends, with libpq's own protocol trace (no stand-in)."""

from __future__ import annotations


class WireTrace:
    """libpq's protocol trace of a peewee PostgreSQL database's current connection for the block.

    `round_trips()` counts the client's waits for the server that run statements: each Sync
    (extended protocol, one per pipeline) whose group executes something, and each Query (simple
    protocol). psycopg's own preparation of a statement it has seen five times (a Parse and a Sync of
    its own, once per connection) is left out, so counts do not depend on what ran before.
    """

    def __init__(self, db, path) -> None:
        self.db, self.path = db, path

    def __enter__(self) -> WireTrace:
        self.file = open(self.path, "w")
        self.pgconn = self.db.connection().pgconn
        self.pgconn.trace(self.file.fileno())
        return self

    def __exit__(self, *exc) -> None:
        self.pgconn.untrace()
        self.file.close()

    def sent(self) -> list[str]:
        """The message types the client sent, in order (Parse, Bind, Execute, Sync, Query, ...)."""
        with open(self.path) as fh:
            return [line.split("\t")[3].strip() for line in fh if line.split("\t")[1:2] == ["F"]]

    def round_trips(self) -> int:
        trips, executes = 0, False
        for kind in self.sent():
            if kind == "Query":
                trips += 1
            elif kind == "Execute":
                executes = True
            elif kind == "Sync":
                trips += executes
                executes = False
        return trips
