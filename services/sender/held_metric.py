"""Gauges of the mail the sender has in hand right now, per tenant, on its Prometheus port:

- ``postbus_sender_queued_messages{tenant_id}``: entries in the tenant's account lanes (waiting for a
  worker, or for their due time: a retry, a rate-limit window);
- ``postbus_sender_held_messages{tenant_id}``: pending messages a worker took from their lane and
  found held (a suspended batch or tenant, the tenant or the instance switched off); they stay out of
  their lane until the suspension or switch changes;
- ``postbus_sender_inflight_messages{tenant_id}``: messages a worker is sending right now (taken from
  the lane, the SMTP transaction not ended).

A tenant with none of a kind has no series of it. ``gmp_pending_messages`` is the total of the first
two. They tell an operator why a tenant's mail waits, and let a test show with evidence that the
sender reached a message and held it, or that it has nothing more of a tenant's to send (all three
at 0: only a new command or a campaign step can give it more)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

TABLE_KEY_SEP = "\x1f"  # services/sender/engine.py table_key: "<tenant>\x1f<message id>"


class SenderGauges(Collector):
    def __init__(self, sender: Any) -> None:  # services.sender.engine.Sender
        self.sender = sender

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued: Counter[str] = Counter()
        for account, lane in list(self.sender.scheduler.lanes.items()):
            queued[account.partition("/")[0]] += len(lane)
        held = {tenant_id: len(keys) for tenant_id, keys in list(self.sender.held.items())}
        inflight = Counter(key.partition(TABLE_KEY_SEP)[0] for key in list(self.sender.inflight))
        for name, text, counts in (
                ("postbus_sender_queued_messages", "Messages in the tenant's account lanes", queued),
                ("postbus_sender_held_messages", "Pending messages held by a suspension or a switch", held),
                ("postbus_sender_inflight_messages", "Messages being sent right now (SMTP)", inflight)):
            family = GaugeMetricFamily(name, text, labels=["tenant_id"])
            for tenant_id, n in sorted(counts.items()):
                if n:
                    family.add_metric([tenant_id], n)
            yield family


def register(sender: Any, registry: CollectorRegistry = REGISTRY) -> None:
    registry.register(SenderGauges(sender))
