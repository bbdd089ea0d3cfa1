"""Issue 9 §3: the on/off switches act. ``PUT /instance {"active": false}``, the admin's tenant-less
suspend/activate ("toggle the scheduler") and a tenant's ``active: false`` stop sending for real and
restart it; ``sync_interval_seconds`` of ``/instance`` is the interval the reporter uses.

Each test first shows the mail flowing (positive control), then switches off, queues two messages and
waits for the sender's evidence that it reached both and held them (``postbus_sender_held_messages``
of the tenant, services/sender/held_metric.py), sees that nothing of the held mail arrived, switches
on and sees every held message exactly once. The interval test uses the reporter's own calls as the
evidence: a delivery report goes through the same per-tenant loop as the idle calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.support.prometheus import sender_metric
from tests.support.smtp_server import RecordingSmtpServer


def _subjects(smtp: RecordingSmtpServer, tenant_id: str) -> list[str]:
    return [m.message["Subject"] for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id]


def _queue(t: Tenant, mid: str) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid, subject=mid)]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text


@pytest.fixture
def instance_restored(admin: httpx.Client) -> Iterator[None]:
    """Whatever a test does to the shared instance, it is active again afterwards."""
    yield
    r = admin.put("/instance", json={"active": True, "sync_interval_seconds": 300})
    assert r.status_code == 200, r.text


def _held(system: LocalSystem, t: Tenant) -> float:
    return sender_metric(system, "postbus_sender_held_messages", tenant_id=t.id)


def _sent_held_released(system: LocalSystem, t: Tenant, smtp: RecordingSmtpServer, off: Callable[[], None],
                        on: Callable[[], None], tag: str) -> None:
    _queue(t, f"{tag}-before")
    wait_until(lambda: f"{tag}-before" in _subjects(smtp, t.id), what="the control message")  # it can send
    assert _held(system, t) == 0
    off()
    _queue(t, f"{tag}-held-1")
    _queue(t, f"{tag}-held-2")
    # evidence, not a wait: the sender took both from their lane and held them (it sends a message at
    # that point or holds it)
    wait_until(lambda: _held(system, t) == 2, timeout=30, what="the sender holding both messages")
    assert [s for s in _subjects(smtp, t.id) if "held" in s] == [], "mail was sent while switched off"
    on()
    wait_until(lambda: {f"{tag}-held-1", f"{tag}-held-2"} <= set(_subjects(smtp, t.id)), what="held mail released")
    assert _held(system, t) == 0
    got = _subjects(smtp, t.id)
    assert got.count(f"{tag}-held-1") == 1 and got.count(f"{tag}-held-2") == 1


def test_instance_active_false_stops_and_restarts_sending(system: LocalSystem, new_tenant, admin: httpx.Client,
                                                          smtp: RecordingSmtpServer, instance_restored) -> None:
    t: Tenant = new_tenant()

    def switch(active: bool) -> None:
        r = admin.put("/instance", json={"active": active})
        assert r.status_code == 200 and r.json()["instance"]["active"] is active, r.text
        assert t.http.get("/status").json()["active"] is active  # read at once: the new state

    _sent_held_released(system, t, smtp, lambda: switch(False), lambda: switch(True), "inst")


def test_admin_suspend_without_tenant_toggles_the_scheduler(system: LocalSystem, new_tenant, admin: httpx.Client,
                                                            smtp: RecordingSmtpServer, instance_restored) -> None:
    t: Tenant = new_tenant()

    def suspend() -> None:
        r = admin.post("/commands/suspend")
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "tenant_id": None, "batch_code": None, "suspended_batches": ["*"],
                            "suspended_all": True}
        assert admin.get("/instance").json()["instance"]["active"] is False

    def activate() -> None:
        r = admin.post("/commands/activate")
        assert r.status_code == 200 and r.json()["suspended_all"] is False and r.json()["suspended_batches"] == []

    _sent_held_released(system, t, smtp, suspend, activate, "sched")
    # a tenant key cannot toggle the instance: without tenant_id it acts on its own tenant only
    r = t.http.post("/commands/suspend")
    assert r.status_code == 200 and r.json()["tenant_id"] == t.id
    assert admin.get("/instance").json()["instance"]["active"] is True
    assert t.http.post("/commands/activate").status_code == 200


def test_tenant_active_false_stops_only_that_tenant(system: LocalSystem, new_tenant, admin: httpx.Client,
                                                    smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    other: Tenant = new_tenant()

    def switch(active: bool) -> None:
        r = admin.put(f"/tenant/{t.id}", json={"active": active})
        assert r.status_code == 200, r.text
        assert admin.get(f"/tenant/{t.id}").json()["active"] is active

    def off() -> None:
        switch(False)
        _queue(other, "other-while-off")  # another tenant keeps sending meanwhile
        wait_until(lambda: "other-while-off" in _subjects(smtp, other.id), what="the other tenant's mail")

    _sent_held_released(system, t, smtp, off, lambda: switch(True), "tenant")


def test_instance_sync_interval_is_the_reporters_interval(new_tenant, admin: httpx.Client,
                                                          instance_restored) -> None:
    t: Tenant = new_tenant()
    _queue(t, "iv-1")
    t.client.wait_for_report(lambda r: r["id"] == "iv-1")
    r = admin.put("/instance", json={"sync_interval_seconds": 1})
    assert r.status_code == 200 and r.json()["instance"]["sync_interval_seconds"] == 1
    assert admin.get("/tenants/sync-status").json()["sync_interval_seconds"] == 1
    # with nothing to report, idle calls now come about every second (the default is 300 s)
    seen = len(t.client.requests)
    wait_until(lambda: len(t.client.requests) >= seen + 3, timeout=20, what="idle calls every second")
    r = admin.put("/instance", json={"sync_interval_seconds": 300})
    assert r.status_code == 200
    # evidence from the reporter's own loop for the tenant, which makes the idle calls and the calls
    # with reports one after the other: a report's call after the change (idle calls decided before
    # it may come first), then, once more than the old interval has passed since that call, another
    # report's call: at 1 s, idle calls would stand between the two
    first = _report_call(t, "iv-2")
    time.sleep(2.5)  # the spacing of the two barriers (> 2 old intervals), not the evidence
    second = _report_call(t, "iv-3")
    idle = [c for c in t.client.sync_calls()[first + 1:second] if not c.delivery_report]
    assert idle == [], f"idle calls went on after the interval was raised: {len(idle)}"


def _report_call(t: Tenant, mid: str) -> int:
    """Queues ``mid`` and returns the index (in the client's sync calls) of the call that reported it."""
    _queue(t, mid)
    t.client.wait_for_report(lambda r: r["id"] == mid)
    calls = t.client.sync_calls()
    return next(i for i, c in enumerate(calls) if any(x["id"] == mid for x in c.delivery_report))
