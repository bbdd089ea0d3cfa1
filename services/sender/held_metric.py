"""Two gauges of what the sender holds back or has in hand right now, on its Prometheus port:

- ``postbus_sender_held_messages{tenant_id}``: pending messages a worker took from their lane and
  found held (a suspended batch or tenant, the tenant or the instance switched off); they stay out of
  their lane until the suspension or switch changes. A tenant with none has no series.
- ``postbus_sender_inflight_messages``: messages a worker is sending right now (taken from the lane,
  the SMTP transaction not ended).

With ``gmp_pending_messages`` they tell an operator why mail waits, and let a test show with evidence
that the sender reached a message and held it, or that it has nothing more to send."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class HeldCollector(Collector):
    def __init__(self, sender: Any) -> None:  # services.sender.engine.Sender
        self.sender = sender

    def collect(self) -> Iterator[GaugeMetricFamily]:
        held = GaugeMetricFamily("postbus_sender_held_messages",
                                 "Pending messages held by a suspension or a switch, per tenant", labels=["tenant_id"])
        for tenant_id, keys in list(self.sender.held.items()):
            if keys:
                held.add_metric([tenant_id], len(keys))
        yield held
        yield GaugeMetricFamily("postbus_sender_inflight_messages", "Messages being sent right now (SMTP)",
                                value=len(self.sender.inflight))


def register(sender: Any, registry: CollectorRegistry = REGISTRY) -> None:
    registry.register(HeldCollector(sender))
