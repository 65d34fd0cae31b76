"""Versioned schema migrations. Each module `mNNNN_name.py` has `VERSION`, `NAME` and
`apply(conn, dialect, app_role)`: `conn` is the peewee database (the URL's own role), `dialect` is
"sqlite" or "postgresql", and `app_role` the PostgreSQL role the application runs as (None on SQLite).
`isolation.migrate.upgrade` applies the pending ones in order.

Add a new module with the next number to change the schema; never edit an applied one.
"""
