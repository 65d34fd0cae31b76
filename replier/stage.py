"""What the replier's stages (gate, inbound, streams, answer) share, handed to each in one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from replier.connections import ConnectionRegistry
from replier.core.config import ReplierSettings
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.store import Store

if TYPE_CHECKING:  # replier.limits builds on the same parts (it is not a stage itself)
    from replier.limits import TenantLimiter


@dataclass(frozen=True, slots=True)
class Shared:
    settings: ReplierSettings
    store: Store  # the batching database store: every database job goes through it
    metrics: Metrics
    connections: ConnectionRegistry  # the open connections and the streams they speak in
    outbox: Outbox  # every send and disconnect
    limits: TenantLimiter  # per-tenant limits and suspension (replier/limits.py)


class Stage:
    """A stage of the replier: reads the shared parts as attributes."""

    def __init__(self, shared: Shared) -> None:
        self.settings = shared.settings
        self.store = shared.store
        self.metrics = shared.metrics
        self.connections = shared.connections
        self.outbox = shared.outbox
        self.limits = shared.limits
