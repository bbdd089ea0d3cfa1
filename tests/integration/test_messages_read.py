"""GET /messages on the running system: lifecycle fields from the metrics service's projection,
history in event order, active_only, reported_ts after the client's acknowledgement, cleanup and
tenant isolation."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Tenant, wait_until

FUTURE = 4102444800  # 2100-01-01: stays deferred for the whole test


def listing(t: Tenant, **params: Any) -> dict[str, dict[str, Any]]:
    r = t.http.get("/messages", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    return {m["id"]: m for m in body["messages"]}


def test_fields_history_active_only_and_reported_ts(new_tenant) -> None:
    t: Tenant = new_tenant()
    t.client.set_response(status=500)  # reports are refused until the client is "fixed" below
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("m-ok", batch_code="b1", priority=1),
        t.message("m-bad", to=["reject@example.test"]),
        t.message("m-later", deferred_ts=FUTURE, priority=0),
    ]})
    assert r.status_code == 200 and r.json()["queued"] == 3, r.text

    # every accepted message is listed at once, the deferred one as deferred
    got = wait_until(lambda: len(m := listing(t)) == 3 and m, what="3 messages listed")
    later = got["m-later"]
    assert later["status"] == "deferred" and later["deferred_ts"] == FUTURE and later["priority"] == 0
    assert later["sent_ts"] is None and later["error_ts"] is None and "history" not in later

    def settled() -> dict[str, dict[str, Any]] | None:
        m = listing(t, include_history="true")
        return m if m["m-ok"]["status"] == "sent" and m["m-bad"]["status"] == "error" else None

    got = wait_until(settled, timeout=45, what="m-ok sent and m-bad error")
    ok, bad = got["m-ok"], got["m-bad"]
    assert ok["tenant_id"] == t.id and ok["tenant_name"] == f"Tenant {t.id}"
    assert ok["account_id"] == "main" and ok["batch_code"] == "b1" and ok["priority"] == 1
    assert ok["pk"] and ok["subject"] == "Subject m-ok" and ok["accepted_ts"] <= ok["sent_ts"]
    assert ok["error"] is None and ok["error_ts"] is None
    assert [h["type"] for h in ok["history"]] == ["sent"]
    assert bad["error_ts"] and "550" in bad["error"] and bad["sent_ts"] is None
    assert [h["type"] for h in bad["history"]] == ["error"] and bad["history"][0]["smtp_code"] == 550
    assert got["m-later"]["history"] == []

    # the client refused every report so far: nothing is reported yet
    wait_until(lambda: any(c.status == 500 and any(i["id"] == "m-ok" for i in c.delivery_report)
                           for c in t.client.sync_calls()), what="a refused report of m-ok")
    assert listing(t)["m-ok"]["reported_ts"] is None

    t.client.set_response({"ok": True, "queued": 0}, status=200)
    got = wait_until(lambda: (m := listing(t, include_history="true"))["m-ok"]["reported_ts"]
                     and m["m-bad"]["reported_ts"] and m, timeout=45, what="reported_ts after the acknowledgement")
    assert got["m-ok"]["reported_ts"] >= got["m-ok"]["sent_ts"]
    assert got["m-ok"]["history"][0]["reported_ts"] == got["m-ok"]["reported_ts"]
    assert got["m-later"]["reported_ts"] is None

    active = listing(t, active_only="true")
    assert set(active) == {"m-later"}

    # cleanup removes the fully reported final messages; the pending one stays
    r = t.http.post(f"/commands/cleanup-messages?tenant_id={t.id}", json={"older_than_seconds": 0})
    assert r.status_code == 200 and r.json()["removed"] == 2, r.text
    wait_until(lambda: set(listing(t)) == {"m-later"}, what="cleaned messages to disappear")


def test_listing_is_tenant_scoped(new_tenant, admin: httpx.Client) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    for t, mid in ((a, "a-1"), (b, "b-1")):
        r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid, deferred_ts=FUTURE)]})
        assert r.status_code == 200, r.text
    wait_until(lambda: "a-1" in listing(a), what="a-1 listed")
    assert set(listing(a)) == {"a-1"}
    assert set(listing(a, tenant_id=a.id)) == {"a-1"}
    r = a.http.get("/messages", params={"tenant_id": b.id})
    assert r.status_code == 401 and r.json()["error"]["code"] == "tenant_mismatch"
    # the admin must name the tenant, and sees exactly that tenant's messages
    r = admin.get("/messages")
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_tenant_id"
    r = wait_until(lambda: (x := admin.get("/messages", params={"tenant_id": b.id})).json()["messages"] and x,
                   what="b-1 listed for the admin")
    assert [m["id"] for m in r.json()["messages"]] == ["b-1"]
    assert r.json()["messages"][0]["tenant_id"] == b.id
    assert httpx.get(f"{admin.base_url}/messages").status_code == 401
    r = a.http.get("/messages", params={"active_only": "maybe"})
    assert r.status_code == 422
