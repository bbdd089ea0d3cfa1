"""services/sender/held_metric.py: the held messages per tenant and the sends in flight, as the
sender's Prometheus endpoint shows them (tests rely on them as evidence that mail was held)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.sender import held_metric


class FakeSender:
    def __init__(self) -> None:
        self.held: dict[str, set[str]] = {}
        self.inflight: set[str] = set()


def _lines(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


def test_held_per_tenant_and_inflight_follow_the_sender() -> None:
    sender, registry = FakeSender(), CollectorRegistry()
    held_metric.register(sender, registry)
    assert _lines(registry) == ["postbus_sender_inflight_messages 0.0"]
    sender.held = {"acme": {"acme/m1", "acme/m2"}, "other": set()}  # an emptied tenant has no series
    sender.inflight = {"acme/m3"}
    assert sorted(_lines(registry)) == ['postbus_sender_held_messages{tenant_id="acme"} 2.0',
                                        "postbus_sender_inflight_messages 1.0"]
    sender.held["acme"].discard("acme/m1")  # released: read at every scrape
    sender.inflight.clear()
    assert sorted(_lines(registry)) == ['postbus_sender_held_messages{tenant_id="acme"} 1.0',
                                        "postbus_sender_inflight_messages 0.0"]
