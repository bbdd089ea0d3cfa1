"""services/sender/held_metric.py: per tenant, the messages in its lanes, held, and being sent, as
the sender's Prometheus endpoint shows them (tests rely on them as evidence that mail was held, or
that a tenant has nothing more to send)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.sender import held_metric
from services.sender.engine import table_key
from services.sender.scheduler import Scheduler


class FakeSender:
    def __init__(self) -> None:
        self.scheduler = Scheduler()
        self.held: dict[str, set[str]] = {}
        self.inflight: set[str] = set()


def _lines(registry: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#"))


def test_queued_held_and_inflight_per_tenant_follow_the_sender() -> None:
    sender, registry = FakeSender(), CollectorRegistry()
    held_metric.register(sender, registry)
    assert _lines(registry) == []
    sender.scheduler.push("acme/main", table_key("acme", "m1"), 2, 1, None, 0)
    sender.scheduler.push("acme/bulk", table_key("acme", "m2"), 2, 2, 10_000, 0)  # due later: still queued
    sender.scheduler.push("other/main", table_key("other", "x"), 2, 3, None, 0)
    sender.held = {"acme": {table_key("acme", "m3"), table_key("acme", "m4")}, "other": set()}  # emptied: no series
    sender.inflight = {table_key("other", "y")}
    assert _lines(registry) == ['postbus_sender_held_messages{tenant_id="acme"} 2.0',
                                'postbus_sender_inflight_messages{tenant_id="other"} 1.0',
                                'postbus_sender_queued_messages{tenant_id="acme"} 2.0',
                                'postbus_sender_queued_messages{tenant_id="other"} 1.0']
    # read at every scrape: a worker takes "x" and sends it, "m3" is released
    assert sender.scheduler.lanes["other/main"].pop(0) == table_key("other", "x")
    sender.inflight = set()
    sender.held["acme"].discard(table_key("acme", "m3"))
    assert _lines(registry) == ['postbus_sender_held_messages{tenant_id="acme"} 1.0',
                                'postbus_sender_queued_messages{tenant_id="acme"} 2.0']
