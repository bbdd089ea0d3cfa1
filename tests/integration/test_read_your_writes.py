"""Read-your-writes on messages, as a client written from the mail-proxy seed documents uses the API:
over HTTP only, reading at once after its own write, no sleeps (issue 9 §1).

- ``add-messages`` then ``GET /messages`` at once: the message is listed.
- ``add-messages`` then ``delete-messages`` at once: ``removed: 1``, gone from the listing at once and
  never sent (the message queued next to it, not deleted, is sent: positive control).
- a sent id queued again at once after the client's delivery report for it: answered ``already
  sent`` and listed ``sent``; queued again at once after the first submission (the send may be in
  flight): sent exactly once and listed ``sent``, never pending forever.
- the message projection (metrics service) down: ``GET /messages``, ``delete-messages`` and
  ``cleanup-messages`` answer 503 ``projection_unavailable`` and change nothing; the queue keeps
  accepting mail.

Each round writes and reads with the tenant's own key, through the same public API a client uses."""

from __future__ import annotations

import time
from typing import Any

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer

ROUNDS = 20
HOLD_S = 6.0  # the delete test's deferral: far longer than one add + delete round trip


def _add(t: Tenant, *messages: dict[str, Any]) -> httpx.Response:
    return t.http.post("/commands/add-messages", json={"messages": list(messages)})


def _listed(t: Tenant, **params: Any) -> dict[str, dict[str, Any]]:
    r = t.http.get("/messages", params=params)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["messages"]}


def _subjects(smtp: RecordingSmtpServer, tenant_id: str) -> list[str]:
    return [m.message["Subject"] for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id]


def test_added_message_is_listed_at_once(new_tenant, admin: httpx.Client) -> None:
    t: Tenant = new_tenant()
    for i in range(ROUNDS):
        mid = f"ryw-{i}"
        r = _add(t, t.message(mid))
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text
        listed = _listed(t)
        assert mid in listed, f"round {i}: {mid} missing from GET /messages right after add-messages"
        assert listed[mid]["status"] in ("pending", "deferred", "sent"), listed[mid]
        # queued by the admin for the tenant, read at once by the admin
        r = admin.post("/commands/add-messages", json={"messages": [t.message(f"adm-{i}")]})
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text
        r = admin.get("/messages", params={"tenant_id": t.id})
        assert r.status_code == 200 and f"adm-{i}" in {m["id"] for m in r.json()["messages"]}, f"round {i}"
    for i in range(ROUNDS):
        mid = f"ryw-deferred-{i}"
        assert _add(t, t.message(mid, deferred_ts=time.time() + 3600)).json()["queued"] == 1
        active = _listed(t, active_only="true")
        assert active[mid]["status"] == "deferred", active.get(mid)


def test_delete_at_once_removes_and_never_sends(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    doomed, kept = [], []
    for i in range(ROUNDS):
        due = time.time() + HOLD_S
        gone, keep = f"del-{i}", f"keep-{i}"
        # the doomed one first in the queue: not deleted, it would go out before its neighbour
        r = _add(t, t.message(gone, subject=f"{t.id} {gone}", deferred_ts=due),
                 t.message(keep, subject=f"{t.id} {keep}", deferred_ts=due))
        assert r.status_code == 200 and r.json()["queued"] == 2, r.text
        r = t.http.post("/commands/delete-messages", json={"ids": [gone]})
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "removed": 1, "not_found": [], "unauthorized": []}, f"round {i}: {r.text}"
        listed = _listed(t)
        assert gone not in listed, f"round {i}: deleted {gone} still listed: {listed[gone]}"
        assert keep in listed
        # deleting it again: it is no longer there
        r = t.http.post("/commands/delete-messages", json={"ids": [gone]})
        assert r.json() == {"ok": True, "removed": 0, "not_found": [gone], "unauthorized": []}, r.text
        doomed.append(gone)
        kept.append(keep)
    # positive control: every kept neighbour is sent once its deferral ends
    wait_until(lambda: all(f"{t.id} {k}" in _subjects(smtp, t.id) for k in kept), timeout=90,
               what="the kept messages to be sent")
    sent = _subjects(smtp, t.id)
    assert not [s for s in sent if s.split(" ", 1)[1] in doomed], sent
    assert sorted(sent) == sorted(f"{t.id} {k}" for k in kept)
    # the client's delivery reports: every kept one sent, nothing about the deleted ones but "deleted"
    t.client.wait_for_reports(lambda rs: {r["id"] for r in rs if r.get("sent_ts")} >= set(kept), timeout=60)
    assert not {r["id"] for r in t.client.reports() if r.get("sent_ts")} & set(doomed)
    listed = _listed(t)
    assert not set(doomed) & set(listed)
    assert all(listed[k]["status"] == "sent" for k in kept), {k: listed[k]["status"] for k in kept}


def test_sent_id_requeued_after_its_report_is_already_sent(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    for i in range(ROUNDS):
        mid = f"once-{i}"
        assert _add(t, t.message(mid, subject=f"{t.id} {mid} v1")).json()["queued"] == 1
        # the client learns the outcome the way the seed describes: the delivery report
        t.client.wait_for_reports(lambda reports, m=mid: any(r.get("id") == m and r.get("sent_ts")
                                                             for r in reports), timeout=60)
        r = _add(t, t.message(mid, subject=f"{t.id} {mid} v2"))
        body = r.json()
        assert r.status_code == 200 and body["ok"] is True  # genro 0.6: an idempotent retry
        already = [{"id": mid, "reason": "already sent", "code": "already_sent"}]
        assert body["queued"] == 0 and body["rejected"] == already, f"round {i}: {r.status_code} {r.text}"
        listed = _listed(t)
        assert listed[mid]["status"] == "sent", f"round {i}: {listed[mid]}"
    subjects = _subjects(smtp, t.id)
    assert sorted(subjects) == sorted(f"{t.id} once-{i} v1" for i in range(ROUNDS)), subjects


def test_sent_id_requeued_before_the_send_is_visible_ends_sent_once(new_tenant, smtp: RecordingSmtpServer) -> None:
    """Queued again at once: whether the sender replaced the pending one or was already sending the
    first (then it keeps that send and ignores the second), the id is sent exactly once and the
    listing ends ``sent`` for it, never pending forever."""
    t: Tenant = new_tenant()
    ids = [f"twice-{i}" for i in range(ROUNDS)]
    for mid in ids:
        assert _add(t, t.message(mid, subject=f"{t.id} {mid} v1")).json()["queued"] == 1
        r = _add(t, t.message(mid, subject=f"{t.id} {mid} v2"))
        body = r.json()
        # the first submission may already be sent and visible: then it is refused as already sent
        already = [{"id": mid, "reason": "already sent", "code": "already_sent"}]
        assert body["queued"] == 1 or body["rejected"] == already, r.text
    wait_until(lambda: all(m["status"] == "sent" for m in _listed(t).values()) and len(_listed(t)) == ROUNDS,
               timeout=90, what="every message listed sent")
    # each id went out once, in one of its two versions
    subjects = _subjects(smtp, t.id)
    assert sorted(s.rsplit(" ", 1)[0] for s in subjects) == sorted(f"{t.id} {m}" for m in ids), subjects
    reports = t.client.wait_for_reports(lambda rs: {r["id"] for r in rs if r.get("sent_ts")} >= set(ids), timeout=60)
    assert {r["id"] for r in reports if r.get("sent_ts")} == set(ids)


def test_projection_down_is_a_503_and_changes_nothing(system: LocalSystem, new_tenant,
                                                       smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    far = time.time() + 3600
    assert _add(t, t.message("held", deferred_ts=far)).json()["queued"] == 1
    assert "held" in _listed(t)  # positive control: the projection answers
    system.stop_service("metrics", timeout=30)
    try:
        r = t.http.get("/messages")
        assert r.status_code == 503, r.text
        assert r.json()["ok"] is False and r.json()["error"]["code"] == "projection_unavailable", r.text
        r = t.http.post("/commands/delete-messages", json={"ids": ["held"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "projection_unavailable", r.text
        r = t.http.post("/commands/cleanup-messages", json={"older_than_seconds": 0})
        assert r.status_code == 503 and r.json()["error"]["code"] == "projection_unavailable", r.text
        # the queue does not depend on the projection: mail is still accepted and sent
        r = _add(t, t.message("during", subject=f"{t.id} during"))
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text
        t.client.wait_for_reports(lambda rs: any(x["id"] == "during" and x.get("sent_ts") for x in rs), timeout=60)
        assert f"{t.id} during" in _subjects(smtp, t.id)
    finally:
        system.start_service("metrics")
    # back: reads see every write at once, and the refused delete changed nothing
    listed = _listed(t)
    assert listed["held"]["status"] == "deferred" and listed["during"]["status"] == "sent", listed
    r = t.http.post("/commands/delete-messages", json={"ids": ["held"]})
    assert r.json() == {"ok": True, "removed": 1, "not_found": [], "unauthorized": []}, r.text
    assert "held" not in _listed(t)
