"""`python -m replier`: serve the replier with uvicorn (uvloop + httptools when installed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from isolation import db as isolation_db
from isolation.config import settings_error_message
from isolation.crypto import SecretBoxError, check_key
from isolation.errors import SchemaVersionError
from isolation.logredact import install as install_redaction
from isolation.logredact import uvicorn_log_config
from isolation.migrate import check_schema
from isolation.system import lookup_api_key
from replier import keyless as keyless_listener
from replier.app import ReplierApp, create_app, http_buffer_limit, media_buffer_limit
from replier.core.config import ReplierSettings, get_settings

log = logging.getLogger("replier")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit (many connections need many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit above %d: %s", soft, exc)
    return soft, hard


class ReplierServer(uvicorn.Server):
    """uvicorn closes connections first on shutdown; we finish in-flight replies before that.

    While the replier drains, a client that still connects is refused by its gate ("server is
    shutting down"); then uvicorn's own shutdown stops listening and closes what is left. The drain
    and uvicorn's `timeout_graceful_shutdown` share one budget, `ReplierSettings.grace_seconds`.

    A second signal (SIGTERM then SIGINT, two SIGINTs, ...) shortens the waits to
    `SHUTDOWN_FORCE_SECONDS` but, unlike uvicorn's own force exit, still runs the lifespan's shutdown:
    the store stops after its queued jobs, key use is flushed and "replier stopped" is logged.
    """

    def __init__(self, config: uvicorn.Config, app: ReplierApp) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self._captured_signals.append(sig)
            log.warning("second stop signal (%s): shortening the shutdown", signal.Signals(sig).name)
            self.app.replier.hurry()
            force = self.app.settings.shutdown_force_seconds
            self.config.timeout_graceful_shutdown = min(self.config.timeout_graceful_shutdown or force, force)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        grace = self.app.settings.grace_seconds
        started = loop.time()
        await self.app.replier.drain(grace)
        # What is left of the budget for uvicorn's wait on its connections' tasks (replies were sent).
        left = max(1.0, grace - (loop.time() - started))
        current = self.config.timeout_graceful_shutdown
        self.config.timeout_graceful_shutdown = min(current, left) if current is not None else left
        await super().shutdown(sockets)


def announce_keyless(listener: keyless_listener.KeylessListener) -> str | None:
    """Check the keyless listener's key in the database (configured) and say loudly what it serves;
    the reason it cannot be used otherwise. The key itself is never logged."""
    principal = lookup_api_key(listener.secret)
    if principal is None:
        return "the keyless listener's api key is unknown (deleted, or never created)"
    reason = principal.refusal()
    if reason:
        return f"the keyless listener's {reason}"
    host, port = listener.address
    log.warning(
        "KEYLESS LISTENER on %s:%d: connections there without a key speak as api key id %s (tenant %s, agent %s)."
        " Anyone who can reach this address can chat as that agent; revoke the key to close them.",
        host,
        port,
        principal.key_id,
        principal.tenant_id,
        principal.agent_id,
    )
    return None


def websocket_limit(settings: ReplierSettings) -> int:
    """uvicorn's `ws_max_size`: the authenticated limit with the websockets-sansio implementation (the
    edge lowers it per connection until authentication), the pre-auth limit with any other."""
    return media_buffer_limit(settings) if settings.ws_impl == "websockets-sansio" else http_buffer_limit(settings)


def main() -> int:
    try:
        settings = get_settings()
    except ValidationError as exc:  # e.g. a public or short SECRET_KEY: the reason, never the value
        print(f"replier: refusing to start: {settings_error_message(exc)}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("maim_message").setLevel(logging.WARNING)
    install_redaction()  # no secret in any line, at any level (see docs/SECURITY.md, "Logs")
    soft, _ = raise_nofile_limit()
    # The event loop and the database threads hand work back and forth for every message; the
    # default 5 ms GIL switch interval turns each hand-off into a potential 5 ms stall.
    sys.setswitchinterval(settings.gil_switch_interval)
    try:
        keyless = keyless_listener.bind(settings)
    except keyless_listener.KeylessError as exc:
        print(f"replier: refusing to start: {exc}", file=sys.stderr)
        return 2
    keyless_listener.remove_from_environment()
    try:
        real = isolation_db.configure(settings.database_url)
        check_schema(real)
        problem = announce_keyless(keyless) if keyless is not None else None
        real.close()
        if problem:
            print(f"replier: refusing to start: {problem}", file=sys.stderr)
            return 2
    except SchemaVersionError as exc:
        print(f"replier: refusing to start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"replier: cannot open the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        # Agents' LLM keys are decrypted with the secret the configurator encrypted them with (SECRET_KEY
        # or the one in DATA_DIR): resolve it now, so a missing or unsafe secret stops the start, not a reply.
        check_key()
    except SecretBoxError as exc:
        print(f"replier: refusing to start: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    log.info("open-files limit %d, loop %s, http %s", soft, loop, http)
    app = create_app(settings, keyless)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=http,
        ws=settings.ws_impl,
        ws_max_size=websocket_limit(settings),  # a larger frame is refused (1009) before it is buffered
        # X-Forwarded-For decides the client address (and so the per-address limit): trusted only from
        # the proxies FORWARDED_ALLOW_IPS names. uvicorn's default trusts it from 127.0.0.1.
        proxy_headers=settings.trusted_proxies is not None,
        forwarded_allow_ips=settings.trusted_proxies,
        lifespan="on",
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config(),
        access_log=False,
        timeout_graceful_shutdown=settings.grace_seconds,
        backlog=4096,
    )
    # uvicorn re-raises Ctrl-C after its graceful shutdown, which is already complete by then.
    sockets = None
    if keyless is not None:  # one server, two sockets: the main one and the keyless listener
        sockets = [config.bind_socket(), keyless.sock]
    with contextlib.suppress(KeyboardInterrupt):
        ReplierServer(config, app).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
