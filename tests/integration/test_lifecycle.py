"""Message lifecycle over HTTP against the running system: suspend/activate (all and per batch),
delete-messages, cleanup-messages, rejected ids reported to the client, gmp_* metrics, isolation.

"Nothing was sent" rests on the sender's evidence, never on a wait alone: the messages it took from
their lane and holds (``postbus_sender_held_messages``), nothing of the tenant's left queued, held or
in flight (services/sender/held_metric.py), an already-sent id ignored (``postbus_sender_already_sent_total``)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, internal_headers, wait_until
from tests.support.prometheus import sender_metric, tenant_idle_at_sender
from tests.support.smtp_server import RecordingSmtpServer


def _subjects(smtp: RecordingSmtpServer, tenant_id: str) -> list[str]:
    return [m.message["Subject"] for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id]


def _arrived(smtp: RecordingSmtpServer, tenant_id: str, *subjects: str) -> bool:
    got = _subjects(smtp, tenant_id)
    return all(s in got for s in subjects)


def _wait_held(system: LocalSystem, t: Tenant, n: int) -> None:
    """Until the sender has taken ``n`` of the tenant's messages from their lane and holds them (at that
    point it sends a message or holds it)."""
    wait_until(lambda: sender_metric(system, "postbus_sender_held_messages", tenant_id=t.id) == n, timeout=30,
               what=f"the sender holding {n} of the tenant's messages")


def _add(t: Tenant, *messages: dict) -> httpx.Response:
    r = t.http.post("/commands/add-messages", json={"messages": list(messages)})
    assert r.status_code == 200, r.text
    return r


def test_suspend_all_holds_mail_until_activate_and_is_idempotent(system: LocalSystem, new_tenant,
                                                                  smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/suspend")
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "tenant_id": t.id, "batch_code": None, "suspended_batches": ["*"],
                        "suspended_all": True}
    again = t.http.post("/commands/suspend", params={"batch_code": "*"})
    assert again.status_code == 200 and again.json() == r.json()  # idempotent

    _add(t, t.message("h-1", subject="held-1", priority=3), t.message("h-2", subject="held-2", batch_code="b"),
         t.message("h-0", subject="held-0", priority=0))
    _wait_held(system, t, 3)
    assert _subjects(smtp, t.id) == []

    r = t.http.post("/commands/activate")
    assert r.status_code == 200
    assert r.json() == {"ok": True, "tenant_id": t.id, "batch_code": None, "suspended_batches": [],
                        "suspended_all": False}
    wait_until(lambda: _arrived(smtp, t.id, "held-0", "held-1", "held-2"), what="held mail released")
    assert sorted(_subjects(smtp, t.id)) == ["held-0", "held-1", "held-2"]  # each exactly once
    assert t.http.post("/commands/activate").json()["suspended_all"] is False  # idempotent


def test_suspending_one_batch_holds_only_that_batch(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/suspend", params={"batch_code": "promo"})
    assert r.status_code == 200
    assert r.json() == {"ok": True, "tenant_id": t.id, "batch_code": "promo", "suspended_batches": ["promo"],
                        "suspended_all": False}
    assert t.http.post("/commands/suspend", params={"batch_code": "promo"}).json()["suspended_batches"] == ["promo"]

    _add(t, t.message("p-1", subject="promo-1", batch_code="promo"),
         t.message("n-1", subject="news-1", batch_code="news"), t.message("u-1", subject="unbatched"))
    wait_until(lambda: _arrived(smtp, t.id, "news-1", "unbatched"), what="other batches to be sent")
    _wait_held(system, t, 1)
    assert "promo-1" not in _subjects(smtp, t.id)

    r = t.http.post("/commands/activate", params={"batch_code": "promo"})
    assert r.status_code == 200 and r.json()["suspended_batches"] == []
    wait_until(lambda: _arrived(smtp, t.id, "promo-1"), what="promo batch released")


def test_activating_one_batch_while_all_are_suspended_is_refused(new_tenant, admin: httpx.Client) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend", params={"batch_code": "a"}).status_code == 200
    assert t.http.post("/commands/suspend").status_code == 200
    r = t.http.post("/commands/activate", params={"batch_code": "a"})
    assert r.status_code == 409
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == "all_batches_suspended" and body["error"]["message"]
    # the admin acts on a named tenant (without one it toggles the whole instance: test_switches.py)
    r = admin.post("/commands/activate", params={"tenant_id": t.id})
    assert r.status_code == 200 and r.json()["suspended_all"] is False and r.json()["suspended_batches"] == []
    assert admin.post("/commands/suspend", params={"tenant_id": "no-such-tenant"}).status_code == 404


def test_lifecycle_routes_keep_tenants_apart(new_tenant, smtp: RecordingSmtpServer) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    for path, body in (("/commands/suspend", None), ("/commands/activate", None),
                       ("/commands/delete-messages", {"ids": ["x"]}), ("/commands/cleanup-messages", {})):
        r = a.http.post(path, params={"tenant_id": b.id}, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "tenant_mismatch", (path, r.text)
        r = httpx.post(a.http.base_url.join(path), params={"tenant_id": a.id}, json=body)
        assert r.status_code == 401, path
    # a's suspension does not hold b's mail
    assert a.http.post("/commands/suspend").status_code == 200
    _add(b, b.message("free", subject="b-free"))
    wait_until(lambda: _arrived(smtp, b.id, "b-free"), what="b's mail while a is suspended")
    assert a.http.post("/commands/activate").status_code == 200


def test_delete_messages_removes_pending_and_reports_not_found_and_unauthorized(
        system: LocalSystem, new_tenant, smtp: RecordingSmtpServer) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    assert a.http.post("/commands/suspend").status_code == 200
    _add(a, a.message("d-1", subject="del-1"), a.message("d-2", subject="del-2"),
         a.message("keep", subject="keep-1"))
    _add(b, b.message("b-own", subject="b-own", deferred_ts=4102444800))

    def lookup() -> dict:
        r = a.http.post("/commands/delete-messages", json={"ids": []})
        assert r.status_code == 200, r.text
        return r.json()

    assert lookup() == {"ok": True, "removed": 0, "not_found": [], "unauthorized": []}
    # the projection learns about queued messages asynchronously: ask until it knows b's message
    r = wait_until(
        lambda: (resp := a.http.post("/commands/delete-messages", params={"tenant_id": a.id},
                                     json={"ids": ["b-own"]})).json()["unauthorized"] == ["b-own"] and resp,
        what="the projection to know b's message")
    assert r.json() == {"ok": True, "removed": 0, "not_found": [], "unauthorized": ["b-own"]}

    r = wait_until(lambda: (resp := a.http.post("/commands/delete-messages",
                                                json={"ids": ["d-1", "d-2", "ghost", "b-own"]}))
                   .json()["removed"] == 2 and resp, what="d-1 and d-2 removed")
    assert r.json() == {"ok": True, "removed": 2, "not_found": ["ghost"], "unauthorized": ["b-own"]}
    assert a.http.post("/commands/activate").status_code == 200
    wait_until(lambda: _arrived(smtp, a.id, "keep-1"), what="the kept message")
    wait_until(lambda: tenant_idle_at_sender(system, a.id), what="nothing of a's left at the sender")
    assert _subjects(smtp, a.id) == ["keep-1"]  # deleted ones never went out
    # b's message is untouched by a's request: still pending, deletable by b
    r = wait_until(lambda: (resp := b.http.post("/commands/delete-messages", json={"ids": ["b-own"]}))
                   .json()["removed"] == 1 and resp, what="b deleting its own message")
    assert r.json()["unauthorized"] == []


def test_rejected_messages_with_an_id_are_reported_as_errors(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = _add(t, t.message("good", subject="good-1"), t.message("bad-addr", to=["not-an-address"]),
             {"id": "no-subject", "tenant_id": t.id, "account_id": t.account_id, "from": "a@x.test",
              "to": ["b@x.test"]},
             {"subject": "no id at all"})
    assert r.json()["queued"] == 1 and len(r.json()["rejected"]) == 3

    def errors() -> dict[str, dict]:
        return {x["id"]: x for x in t.client.reports() if "error_ts" in x}

    got = wait_until(lambda: len(errors()) >= 2 and errors(), what="rejections reported as errors")
    assert set(got) == {"bad-addr", "no-subject"}
    assert got["bad-addr"]["error"] == "invalid address in to: 'not-an-address'"
    assert got["no-subject"]["error"] == "missing subject"
    assert got["bad-addr"]["tenant_id"] == t.id and got["bad-addr"]["pk"]
    wait_until(lambda: any(x["id"] == "good" and "sent_ts" in x for x in t.client.reports()), what="good sent")
    # an all-rejected call is reported too
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("bad-2", to=["nope"])]})
    assert r.status_code == 400
    wait_until(lambda: "bad-2" in errors(), what="the all-rejected call's report")


def test_cleanup_keeps_sent_ids_unsendable(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer,
                                           admin: httpx.Client) -> None:
    t: Tenant = new_tenant()
    _add(t, t.message("c-1", subject="clean-1"))
    wait_until(lambda: _arrived(smtp, t.id, "clean-1"), what="sent")
    wait_until(lambda: any(x["id"] == "c-1" and "sent_ts" in x for x in t.client.reports()), what="reported")
    # nothing is old enough under the default retention (7 days)
    r = t.http.post("/commands/cleanup-messages")
    assert r.status_code == 200 and r.json() == {"ok": True, "removed": 0}
    r = admin.post("/commands/cleanup-messages", params={"tenant_id": t.id}, json={"older_than_seconds": 0})
    assert r.status_code == 200 and set(r.json()) == {"ok", "removed"}
    assert admin.post("/commands/cleanup-messages", json={}).status_code == 400
    assert t.http.post("/commands/cleanup-messages", json={"older_than_seconds": -1}).status_code == 422
    # once the acknowledgement is recorded the message is cleaned up; the id still is never sent again
    if r.json()["removed"] == 0:
        wait_until(lambda: t.http.post("/commands/cleanup-messages", json={"older_than_seconds": 0})
                   .json()["removed"] >= 1, timeout=30, what="cleanup of c-1")
    assert sender_metric(system, "postbus_sender_already_sent_total", tenant_id=t.id) == 0
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("c-1", subject="clean-again")]})
    assert r.status_code == 200, r.text
    refused_by_api = r.json()["queued"] == 0  # the API's projection knew it was sent: never queued
    if refused_by_api:
        assert r.json()["rejected"] == [{"id": "c-1", "reason": "already sent", "code": "already_sent"}], r.text
    _add(t, t.message("c-2", subject="after-cleanup"))
    wait_until(lambda: _arrived(smtp, t.id, "after-cleanup"), what="a later message")
    # evidence: the resubmitted id was refused by the API, or the sender read it and ignored it as
    # already sent; and nothing of the tenant's is left at the sender queued, held or in flight
    wait_until(lambda: (refused_by_api
                        or sender_metric(system, "postbus_sender_already_sent_total", tenant_id=t.id) == 1)
               and tenant_idle_at_sender(system, t.id), what="the resubmitted id ignored")
    assert "clean-again" not in _subjects(smtp, t.id)


def test_sender_exports_gmp_counters_at_zero_for_every_account(system, new_tenant) -> None:
    t: Tenant = new_tenant()
    want = {"tenant_id": t.id, "account_id": t.account_id}

    def samples() -> dict[str, float]:
        text = httpx.get(system.url("sender") + "/metrics", headers=internal_headers(system), timeout=10).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.labels == want or s.name == "gmp_pending_messages"}

    got = wait_until(lambda: len(s := samples()) >= 5 and s, what="the account's series")
    for name in ("gmp_sent_total", "gmp_errors_total", "gmp_deferred_total", "gmp_rate_limited_total"):
        assert got[name] == 0.0, name
    assert "gmp_pending_messages" in got


def test_deleting_an_account_ends_its_pending_mail_as_errors(system: LocalSystem, new_tenant,
                                                             smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend").status_code == 200
    _add(t, t.message("orphan", subject="orphan-1"))
    _wait_held(system, t, 1)  # the sender took the message in (held by the suspension)
    r = t.http.delete(f"/account/{t.account_id}")
    assert r.status_code == 200, r.text
    report = t.client.wait_for_report(lambda x: x["id"] == "orphan" and "error_ts" in x)
    assert report["error"] == "account deleted"
    assert t.http.post("/commands/activate").status_code == 200
    # evidence: the sender has nothing of the tenant's queued, held or in flight, so activating has
    # nothing to release (the message ended as an error)
    wait_until(lambda: tenant_idle_at_sender(system, t.id), what="nothing of the tenant's left at the sender")
    assert _subjects(smtp, t.id) == []


def test_held_mail_stays_held_across_a_sender_kill(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/suspend", params={"batch_code": "night"}).status_code == 200
    _add(t, t.message("n-1", subject="night-1", batch_code="night"), t.message("d-1", subject="day-1"))
    wait_until(lambda: _arrived(smtp, t.id, "day-1"), what="the unsuspended message")
    system.kill_service("sender")
    system.start_service("sender")
    _wait_held(system, t, 1)  # the restarted sender reached the message and held it
    assert "night-1" not in _subjects(smtp, t.id)
    assert t.http.post("/commands/activate", params={"batch_code": "night"}).status_code == 200
    wait_until(lambda: _arrived(smtp, t.id, "night-1"), timeout=60, what="held mail after the restart")
    assert _subjects(smtp, t.id).count("night-1") == 1
