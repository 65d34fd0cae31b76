"""`python -m isolation upgrade|version|check`: database operations without invoke."""

from __future__ import annotations

import argparse
import sys

from isolation import migrate
from isolation.config import get_base_settings
from isolation.errors import SchemaVersionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isolation", description=__doc__)
    parser.add_argument("command", choices=["upgrade", "version", "check"])
    parser.add_argument("--database-url", default=None, help="defaults to DATABASE_URL")
    args = parser.parse_args(argv)
    url = args.database_url or get_base_settings().database_url
    try:
        if args.command == "upgrade":
            applied = migrate.upgrade(url)
            done = ", ".join(map(str, applied)) if applied else "nothing to do"
            print(f"{migrate.describe(url)}: schema at version {migrate.LATEST_VERSION} (applied: {done})")
        elif args.command == "version":
            print(migrate.current_version(url))
        else:
            version = migrate.current_version(url)
            if version != migrate.LATEST_VERSION:
                raise SchemaVersionError(
                    f"schema at version {version}, code needs {migrate.LATEST_VERSION}: run `invoke db-upgrade`"
                )
            print(f"schema version {version}: ok")
    except SchemaVersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
