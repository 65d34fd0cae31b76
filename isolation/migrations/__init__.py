"""Versioned schema migrations. Each module `mNNNN_name.py` has `VERSION`, `NAME` and `apply(conn)`.

Add a new module with the next number to change the schema; never edit an applied one.
"""
