"""Replier settings (pydantic-settings: environment variables or `.env`).

The database, secret and outbound LLM policy settings (`DATABASE_URL`, `SECRET_KEY`, `DATA_DIR`,
`LLM_BASE_URL`, `LLM_ALLOWED_HOSTS`, ...) are the shared ones of `isolation.config` and
`isolation.egress`; this class adds what only the replier reads. A public or short `SECRET_KEY` fails
validation here, so `python -m replier` refuses to start with it.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr

from isolation.egress import EgressSettings

SHUTDOWN_MARGIN_SECONDS = 5.0  # storing and sending a reply after its model call


class ReplierSettings(EgressSettings):
    """The shared settings (database, secret, outbound LLM policy) plus the replier's own."""

    host: str = "127.0.0.1"
    port: int = Field(default=8095, ge=0, le=65535)
    log_level: str = "info"
    ws_impl: str = Field(default="websockets-sansio", description="uvicorn websocket implementation")

    # Several repliers behind a balancer (README "Scaling out"): this one's name, unique in the
    # deployment. Its Engine.IO session ids start with it, which the balancer routes by.
    instance_name: str = Field(default="", pattern=r"^([a-z0-9][a-z0-9-]{0,30})?$")

    # Connections
    max_connections: int = Field(default=10_000, ge=1)
    key_cache_seconds: float = Field(default=2.0, ge=0)
    revocation_check_seconds: float = Field(default=3.0, gt=0)
    ping_interval: float = 25.0
    ping_timeout: float = 20.0

    # Before authentication (see replier/edge.py and replier/sessions.py)
    max_unauthenticated: int = Field(default=512, ge=1, description="sessions waiting to authenticate, all clients")
    auth_timeout_seconds: float = Field(default=5.0, gt=0, description="to authenticate after the handshake")
    max_connections_per_address: int = Field(default=256, ge=1, description="open sessions per client address")
    http_body_timeout_seconds: float = Field(default=10.0, gt=0, description="to send a polling request body")
    malformed_log_seconds: float = Field(default=60.0, gt=0, description="one warning per address per interval")
    forwarded_allow_ips: str = Field(
        default="", description="proxies whose X-Forwarded-For is trusted (uvicorn syntax); empty: none"
    )

    # Input limits
    max_text_bytes: int = Field(default=16 * 1024, ge=1)
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024, description="a message without its inline media")
    max_media_bytes: int = Field(
        default=10 * 1024 * 1024, ge=0, description="inline images, emoji and voice per message (decoded bytes)"
    )
    max_large_messages_per_tenant: int = Field(
        default=4, ge=1, description="messages over the pre-auth limit one tenant may have in the server at once"
    )
    dedup_ttl_seconds: float = Field(default=3600.0, ge=0)

    # Keyless listener (MaiBot adapters that send no key; see docs/ADAPTERS.md). Off unless set.
    keyless_listen: str = Field(default="", description="host:port of an extra listener bound to one api key")
    keyless_api_key_file: str = Field(default="", description="file holding the mtk_ key the listener stands for")
    keyless_api_key: SecretStr = Field(default=SecretStr(""), description="the key itself (prefer the file)")
    keyless_allow_remote: bool = Field(default=False, description="allow a non-loopback keyless listener")

    # Database work
    db_workers: int = Field(default=0, ge=0, le=64, description="0 = 1 for SQLite, 2 for PostgreSQL")
    db_batch_max: int = Field(default=256, ge=1)
    chat_synchronous_commit: bool = Field(
        default=True,
        description="PostgreSQL: off = chat batches commit without waiting for the WAL flush (docs/RELIABILITY.md)",
    )
    agent_cache_seconds: float = Field(default=2.0, ge=0)
    context_cache_seconds: float = Field(default=5.0, ge=0, description="history/memory cache per stream; 0 = off")
    usage_flush_seconds: float = Field(default=5.0, gt=0)

    # Recovery: stored messages with no reply, and replies never handed to a connection
    recovery_max_age_seconds: float = Field(
        default=600.0, ge=0, description="older unanswered messages / undelivered replies are left alone; 0 = off"
    )
    recovery_interval_seconds: float = Field(default=30.0, gt=0, description="how often to look for stalled work")
    recovery_grace_seconds: float = Field(
        default=10.0, ge=0, description="younger unanswered messages may still be in flight elsewhere: not yet"
    )

    # LLM (global default used when an agent's provider is "default"; LLM_BASE_URL is an EgressSettings field)
    llm_provider: str = Field(default="", description="openai | offline | empty (= offline)")
    llm_model: str = ""
    llm_api_key: str = ""
    llm_timeout_seconds: float = Field(default=30.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0, le=10)
    llm_retry_backoff_seconds: float = Field(default=0.25, ge=0)
    llm_concurrency: int = Field(default=16, ge=1, description="calls at once per endpoint (URL + key)")
    llm_tenant_concurrency: int = Field(
        default=0, ge=0, description="calls at once per tenant per endpoint; 0 = half of llm_concurrency"
    )
    llm_deadline_seconds: float = Field(
        default=0.0, ge=0, description="one message's calls, slot wait and retries; 0 = timeout + max(1 s, 25%)"
    )
    llm_breaker_failures: int = Field(default=5, ge=1, description="consecutive failures opening a breaker")
    llm_breaker_cooldown_seconds: float = Field(default=30.0, gt=0, description="open breaker until a probe")
    llm_breaker_metric_tenants: int = Field(
        default=10, ge=0, le=100, description="tenants labelled in replier_llm_breakers_open_tenant (top N)"
    )
    llm_max_providers: int = Field(
        default=256, ge=1, description="idle LLM endpoint clients kept (URL + key); least recently used dropped"
    )
    llm_memory_extraction: bool = True

    # Per-tenant limits (replier/limits.py; the limits themselves are shared settings, isolation/config.py)
    limits_refresh_seconds: float = Field(
        default=2.0, gt=0, le=60, description="how often operators' overrides and suspensions are re-read"
    )
    token_budget_sync_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="with REDIS_URL: how often a tenant's tokens of the day are read again from the database "
        "(what the other repliers spent)",
    )
    metrics_tenant_labels: int = Field(
        default=20, ge=0, le=1000, description="tenants (the top users of their budget) with their own metrics label"
    )

    # Process
    gc_freeze: bool = True
    gil_switch_interval: float = Field(default=0.0005, gt=0, le=0.1)
    shutdown_grace_seconds: float | None = Field(
        default=None, ge=0, description="unset: one LLM call with its retries plus a margin (`grace_seconds`)"
    )
    shutdown_force_seconds: float = Field(default=3.0, ge=0, description="the wait left after a second signal")

    @property
    def grace_seconds(self) -> float:
        """How long a graceful stop waits for in-flight replies: `SHUTDOWN_GRACE_SECONDS`, or by default
        what one model call may take with every retry (timeouts plus exponential backoff) and a margin
        to store and send the reply, so a SIGTERM never cuts a reply that is on its way."""
        if self.shutdown_grace_seconds is not None:
            return self.shutdown_grace_seconds
        return self.answer_budget_seconds

    @property
    def answer_budget_seconds(self) -> float:
        """The longest one answer may take: one model call with every retry, plus a margin (also how
        long another replier's lock on a stream lasts, `replier.stream_locks`)."""
        attempts = self.llm_max_retries + 1
        backoff = self.llm_retry_backoff_seconds * (2**self.llm_max_retries - 1)
        return self.llm_timeout_seconds * attempts + backoff + SHUTDOWN_MARGIN_SECONDS

    @property
    def max_message_bytes(self) -> int:
        """The largest message read and answered: the text limit plus twice the media limit as base64,
        so a file over the media limit still gets a `media_too_large` error in its chat."""
        return self.max_payload_bytes + 2 * (-(-self.max_media_bytes // 3) * 4)

    @property
    def trusted_proxies(self) -> str | None:
        """FORWARDED_ALLOW_IPS when set to something (blank counts as unset: no proxy headers)."""
        value = self.forwarded_allow_ips.strip()
        return value or None


@lru_cache(maxsize=1)
def get_settings() -> ReplierSettings:
    return ReplierSettings()
