"""Readings of a service's Prometheus endpoint that tests take as evidence (instead of waiting a
fixed time and seeing nothing happen): e.g. that the sender reached a message and held it, or that
it has nothing more of a tenant's to send (services/sender/held_metric.py)."""

from __future__ import annotations

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import internal_headers

TENANT_GAUGES = ("postbus_sender_queued_messages", "postbus_sender_held_messages", "postbus_sender_inflight_messages")


def prom(url: str, headers: dict[str, str], name: str, **labels: str) -> float:
    """The sum of the samples of metric ``name`` (those with all of ``labels``) at the Prometheus
    endpoint ``url``; 0 when there is none."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, (url, r.status_code)
    total = 0.0
    for line in r.text.splitlines():
        series, _, value = line.rpartition(" ")
        if series != name and not series.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def sender_metric(system: LocalSystem, name: str, **labels: str) -> float:
    """``prom`` of the system's (first) sender."""
    return prom(system.url("sender"), internal_headers(system), name, **labels)


def sender_idle(url: str, headers: dict[str, str], tenant_id: str | None = None) -> bool:
    """Nothing in a lane, held or being sent (of ``tenant_id``, or of anyone): the sender sends nothing
    more (of it) until a command or a campaign step gives it more."""
    labels = {"tenant_id": tenant_id} if tenant_id else {}
    return all(prom(url, headers, name, **labels) == 0 for name in TENANT_GAUGES)


def tenant_idle_at_sender(system: LocalSystem, tenant_id: str) -> bool:
    return sender_idle(system.url("sender"), internal_headers(system), tenant_id)
