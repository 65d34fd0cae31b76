"""`python -m configurator`: serve the configurator with uvicorn.

HOST (default 127.0.0.1), PORT (8000), DATABASE_URL (isolation's default), SECRET_KEY, ENVIRONMENT …
come from the environment or `.env` (see configurator/core/config.py).

X-Forwarded-For/-Proto are honoured only from the proxies named in FORWARDED_ALLOW_IPS; unset, uvicorn's
proxy support is off (its own default would trust loopback, and a client on the same host could then
choose the address the login limits count).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from pydantic import ValidationError

from isolation.config import settings_error_message
from isolation.errors import SchemaVersionError
from isolation.logredact import install as install_redaction
from isolation.logredact import uvicorn_log_config
from isolation.migrate import describe


def describe_safely(url: str) -> str:
    try:
        return describe(url)
    except ValueError:
        return "the database (unparseable DATABASE_URL)"


def uvicorn_options(settings) -> dict:
    """Keyword arguments of `uvicorn.run` for these settings (proxy headers only from FORWARDED_ALLOW_IPS)."""
    proxies = settings.trusted_proxies
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": uvicorn_log_config(),  # its handlers redact secrets (the access log shows query strings)
        "proxy_headers": proxies is not None,
        "forwarded_allow_ips": proxies,
        "server_header": False,
    }


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from configurator.core.config import Settings
    from configurator.core.db import close_database, init_database
    from configurator.main import create_app

    parser = argparse.ArgumentParser(prog="python -m configurator", description=__doc__)
    parser.add_argument("--host", default=None, help="default: HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: PORT or 8000")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"configurator: invalid settings: {settings_error_message(exc)}", file=sys.stderr)
        return 2
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()  # no secret in any line, at any level (see docs/SECURITY.md, "Logs")
    url = settings.database_url
    try:
        init_database(settings)  # refuse to start on an unknown schema, with the command to run
    except (SchemaVersionError, ValueError) as exc:
        print(f"configurator: {describe_safely(url)}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # cannot connect: say which database, never its password
        print(f"configurator: cannot open {describe_safely(url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        close_database()
    # uvicorn re-raises Ctrl-C after its graceful shutdown, which is already complete by then.
    with contextlib.suppress(KeyboardInterrupt):
        if settings.workers > 1:
            # Worker processes import the app themselves (an import string, `create_app()` reading
            # the same environment): each runs the lifespan, so each opens and checks its database.
            # A worker that does not answer the supervisor's ping in time is killed and replaced: 30 s,
            # not uvicorn's 5, because a busy host can take longer than 5 s to import a new worker.
            uvicorn.run(
                "configurator.main:create_app",
                factory=True,
                workers=settings.workers,
                timeout_worker_healthcheck=30,
                **uvicorn_options(settings),
            )
        else:
            uvicorn.run(create_app(settings), **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
