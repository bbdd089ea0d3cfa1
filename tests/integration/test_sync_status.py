"""GET /tenants/sync-status and run-now semantics on the running system: a client answering
``next_sync_after`` puts its tenant in Do-Not-Disturb; the admin's run-now respects it, the
tenant's own run-now overrides it."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, internal_headers, wait_until
from tests.support.prometheus import prom

KEYS = {"id", "name", "active", "client_base_url", "last_sync_ts", "next_sync_due", "in_dnd"}


def status_of(admin: httpx.Client, tenant_id: str) -> dict[str, Any] | None:
    r = admin.get("/tenants/sync-status")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"ok", "sync_interval_seconds", "tenants"} and body["ok"] is True
    assert body["sync_interval_seconds"] == 300
    for row in body["tenants"]:
        assert set(row) == KEYS
    return next((row for row in body["tenants"] if row["id"] == tenant_id), None)


def test_sync_status_shape_and_never_synced_tenant(admin: httpx.Client, new_tenant) -> None:
    tid = "idle-" + uuid.uuid4().hex[:8]
    r = admin.post("/tenant", json={"id": tid, "name": "Idle Corp"})  # no client_base_url: never called
    assert r.status_code == 200, r.text
    row = wait_until(lambda: status_of(admin, tid), what="the new tenant in sync-status")
    assert row == {"id": tid, "name": "Idle Corp", "active": True, "client_base_url": None,
                   "last_sync_ts": None, "next_sync_due": True, "in_dnd": False}
    t: Tenant = new_tenant()
    assert t.http.get("/tenants/sync-status").status_code == 403
    assert httpx.get(f"{admin.base_url}/tenants/sync-status").status_code == 401
    # a tenant with an endpoint gets its first (empty) call and is then not due until the interval
    row = wait_until(lambda: (s := status_of(admin, t.id)) and s["last_sync_ts"] and s, what="first sync")
    assert row["in_dnd"] is False and row["next_sync_due"] is False
    assert abs(row["last_sync_ts"] - time.time()) < 60 and row["client_base_url"].startswith("http://127.0.0.1")


def test_dnd_respected_by_admin_run_now_and_overridden_by_tenant_run_now(system: LocalSystem, admin: httpx.Client,
                                                                         new_tenant) -> None:
    quiet: Tenant = new_tenant()
    other: Tenant = new_tenant()
    until = int(time.time()) + 3600
    quiet.client.set_response({"ok": True, "queued": 0, "next_sync_after": until})
    wait_until(lambda: quiet.client.sync_calls() and other.client.sync_calls(), what="first calls")

    # the tenant's own run-now forces a call even without events; the answer sets DND
    before = len(quiet.client.sync_calls())
    r = quiet.http.post("/commands/run-now")
    assert r.status_code == 200, r.text
    wait_until(lambda: len(quiet.client.sync_calls()) > before, timeout=15, what="forced sync call")
    row = wait_until(lambda: (s := status_of(admin, quiet.id)) and s["in_dnd"] and s, what="in_dnd")
    assert row["last_sync_ts"] == until and row["next_sync_due"] is False

    # the admin's run-now wakes every loop but forces a call only where reports are pending (never an
    # empty call to every tenant) and respects the DND: other has a report pending, quiet has none
    other.client.set_response(status=500)  # other's report stays pending
    assert other.http.post("/commands/add-messages", json={"messages": [other.message("pend-1")]}).json()["queued"]
    other.client.wait_for_reports(lambda reps: any(x["id"] == "pend-1" for x in reps), timeout=45)
    other.client.set_response({"ok": True, "queued": 0}, status=200)
    quiet_calls = len(quiet.client.sync_calls())
    assert admin.post("/commands/run-now").status_code == 200
    wait_until(lambda: any(c.status == 200 and any(x["id"] == "pend-1" for x in (c.json or {}).get(
        "delivery_report", [])) for c in other.client.requests), timeout=15, what="admin run-now call")
    # evidence that the admin's run-now (processed: other's call above) made no call to quiet: quiet's
    # loop in the reporter makes its calls one after the other, and a call with a report goes through
    # it despite the DND; any call the run-now caused would stand before that one
    assert quiet.http.post("/commands/add-messages", json={"messages": [quiet.message("dnd-barrier")]}).json()["queued"]
    quiet.client.wait_for_report(lambda x: x["id"] == "dnd-barrier", timeout=45)
    after = quiet.client.sync_calls()[quiet_calls:]
    first_report = next(i for i, c in enumerate(after) if any(x["id"] == "dnd-barrier" for x in c.delivery_report))
    assert after[:first_report] == [], "the admin's run-now called a tenant in DND with nothing to report"
    # the reporter is done with that call (its answer set the DND again) before the run-now below: a
    # run-now processed while the call is still in hand is undone by the call's answer
    wait_until(lambda: prom(system.url("reporter"), internal_headers(system), "postbus_reporter_reports_sent_total",
                            tenant_id=quiet.id) >= 1, what="the report's call acknowledged by the reporter")
    assert status_of(admin, quiet.id)["in_dnd"]
    quiet_calls = len(quiet.client.sync_calls())

    # ... while the tenant's run-now overrides it again
    quiet.client.set_response({"ok": True, "queued": 0})  # this time no new DND
    assert quiet.http.post("/commands/run-now").status_code == 200
    wait_until(lambda: len(quiet.client.sync_calls()) > quiet_calls, timeout=15, what="override call")
    row = wait_until(lambda: (s := status_of(admin, quiet.id)) and not s["in_dnd"] and s, what="DND cleared")
    assert row["last_sync_ts"] <= time.time() + 1

    # calls with events are not held by DND either (PRODUCT.md §3)
    other.client.set_response({"ok": True, "queued": 0, "next_sync_after": until})
    other_calls = len(other.client.sync_calls())
    assert other.http.post("/commands/run-now").status_code == 200
    wait_until(lambda: len(other.client.sync_calls()) > other_calls, timeout=15, what="DND for other")
    wait_until(lambda: status_of(admin, other.id)["in_dnd"], what="other in DND")
    r = other.http.post("/commands/add-messages", json={"messages": [other.message("dnd-1")]})
    assert r.status_code == 200, r.text
    other.client.wait_for_report(lambda x: x["id"] == "dnd-1" and "sent_ts" in x, timeout=45)
