"""Prometheus metrics of one replier process (its own registry, served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from replier.llm.breaker import Breakers


class BreakerCollector(Collector):
    """The LLM breakers' state, read at scrape time.

    Label cardinality stays bounded: the totals carry no tenant label, and the per-tenant gauge
    names only the `top` tenants with the most open breakers at this scrape (ties by tenant id), so
    a scrape holds at most `top` tenant series whatever the number of tenants.
    """

    def __init__(self, breakers: Breakers, top: int) -> None:
        self.breakers = breakers
        self.top = top

    def collect(self) -> Iterator[Metric]:
        per_tenant = self.breakers.open_by_tenant()
        yield GaugeMetricFamily(
            "replier_llm_breakers_open", "Open (or half-open) LLM breakers", sum(per_tenant.values())
        )
        yield GaugeMetricFamily(
            "replier_llm_breaker_tenants", "Tenants with at least one open LLM breaker", len(per_tenant)
        )
        top = GaugeMetricFamily(
            "replier_llm_breakers_open_tenant",
            "Open LLM breakers of the tenants with the most of them (top N only: bounded cardinality)",
            labels=["tenant"],
        )
        for tenant, count in sorted(per_tenant.items(), key=lambda item: (-item[1], item[0]))[: self.top]:
            top.add_metric([tenant], count)
        yield top
        transitions = CounterMetricFamily(
            "replier_llm_breaker_transitions", "LLM breakers opened or closed", labels=["to"]
        )
        transitions.add_metric(["open"], self.breakers.opened_total)
        transitions.add_metric(["closed"], self.breakers.closed_total)
        yield transitions
        yield CounterMetricFamily(
            "replier_llm_breaker_rejected", "Messages answered by an open breaker", value=self.breakers.rejected_total
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("replier_connections", "Open Socket.IO connections", ["protocol"], registry=r)
        self.connects = Counter("replier_connects", "Accepted connections", ["protocol"], registry=r)
        self.refused = Counter("replier_connections_refused", "Refused connections", ["reason"], registry=r)
        self.messages_in = Counter("replier_messages_in", "Chat messages received and accepted", registry=r)
        self.messages_out = Counter("replier_messages_out", "Replies sent", registry=r)
        self.duplicates = Counter("replier_duplicates", "Replayed messages (msg_id or message id)", registry=r)
        self.rejected = Counter("replier_messages_rejected", "Inbound messages rejected", ["code"], registry=r)
        self.notices = Counter(
            "replier_notices", "Adapters' notify messages (echo: a delivered reply's platform id)", ["kind"], registry=r
        )
        self.reply_latency = Histogram(
            "replier_reply_latency_seconds",
            "From receiving a message to sending its reply",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.llm_requests = Counter("replier_llm_requests", "LLM calls", ["provider", "outcome"], registry=r)
        self.llm_errors = Counter("replier_llm_errors", "Failed LLM calls", ["provider"], registry=r)
        self.edge_refused = Counter(
            "replier_edge_refused",
            "Requests refused and sessions closed before reaching Socket.IO (body size or time, malformed body,"
            " too many unauthenticated sessions or per address, authentication timeout)",
            ["reason"],
            registry=r,
        )
        self.unauthenticated = Gauge(
            "replier_unauthenticated_sessions", "Engine.IO sessions not (yet) authenticated", registry=r
        )
        self.malformed_frames = Counter(
            "replier_malformed_frames", "Malformed Engine.IO / Socket.IO frames ignored", registry=r
        )
        self.revoked_closed = Counter(
            "replier_revoked_connections_closed", "Connections closed after their key was revoked", registry=r
        )

        # Per-tenant limits (replier/limits.py). Tenant labels only on the gauges, for at most
        # METRICS_TENANT_LABELS tenants, rebuilt at each limits refresh: bounded cardinality.
        self.throttled = Counter(
            "replier_throttled",
            "Messages and connections refused by a per-tenant limit or suspension",
            ["limit"],
            registry=r,
        )
        self.tenants_over_budget = Gauge(
            "replier_tenants_over_budget", "Connected tenants that used their token budget", registry=r
        )
        self.tenant_tokens = Gauge(
            "replier_tenant_tokens_used", "LLM tokens of the budget day (top tenants)", ["tenant"], registry=r
        )
        self.tenant_budget_ratio = Gauge(
            "replier_tenant_budget_used_ratio", "Share of the token budget used (top tenants)", ["tenant"], registry=r
        )
        self.tenant_throttled = Gauge(
            "replier_tenant_throttled", "Refusals by a limit in the budget day (top tenants)", ["tenant"], registry=r
        )

    def watch_breakers(self, breakers: Breakers, top: int) -> None:
        """Export `breakers` (see `BreakerCollector`) from this registry."""
        self.registry.register(BreakerCollector(breakers, top))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
