"""End to end on real servers: REST -> Kafka -> sender -> SMTP server -> events -> reporter -> client
app, and events -> ClickHouse -> tenant SMTP metrics."""

from __future__ import annotations

import httpx

from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer


def _tenant_mail(smtp: RecordingSmtpServer, tenant_id: str) -> list:
    return [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id]


def test_messages_travel_to_smtp_and_reports_reach_the_client(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    messages = [
        t.message("m-1", to=["Bob <bob@example.test>", "carol@example.test"], cc=["dave@example.test"],
                  bcc=["hidden@example.test"], headers={"X-Campaign": "spring"}, message_id="<custom-1@acme.test>",
                  return_path="bounces@acme.test", subject="Grüße ✓"),
        t.message("m-2", body="<p>html body</p>", content_type="html"),
        t.message("m-bad", to=["reject@example.test"]),
    ]
    r = t.http.post("/commands/add-messages", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "queued": 3, "rejected": []}

    got = wait_until(lambda: len(_tenant_mail(smtp, t.id)) >= 2 and _tenant_mail(smtp, t.id), what="2 mails")
    by_id = {m.message["X-Postbus-Message-Id"]: m for m in got}
    assert set(by_id) == {"m-1", "m-2"}
    m1 = by_id["m-1"]
    assert m1.mail_from == "bounces@acme.test"
    assert sorted(m1.rcpt_tos) == ["bob@example.test", "carol@example.test", "dave@example.test",
                                   "hidden@example.test"]
    assert m1.message["Message-ID"] == "<custom-1@acme.test>"
    assert m1.message["Subject"] == "Grüße ✓"
    assert m1.message["X-Campaign"] == "spring"
    assert "hidden@example.test" not in m1.data.decode()  # bcc only in the envelope
    assert m1.message.get_content().strip() == "Body of m-1"
    m2 = by_id["m-2"]
    assert m2.message.get_content_type() == "text/html"
    assert m2.message.get_content().strip() == "<p>html body</p>"
    assert m2.message["Message-ID"].endswith(f"@{t.id}.test>")

    def reports() -> dict[str, dict]:
        return {r["id"]: r for r in t.client.reports() if "sent_ts" in r or "error_ts" in r}

    final = wait_until(lambda: len(reports()) == 3 and reports(), timeout=45, what="3 final reports")
    assert "sent_ts" in final["m-1"] and "sent_ts" in final["m-2"]
    assert "error_ts" in final["m-bad"] and "550" in final["m-bad"]["error"]
    for report in final.values():
        assert report["tenant_id"] == t.id and report["pk"]
    calls = t.client.sync_calls()
    assert calls and all(c.headers.get("authorization") == "Bearer s3cret" for c in calls)

    def metrics() -> dict:
        r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"},
                       headers={"Authorization": f"Bearer {t.api_key}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True
        return body["data"]

    data = wait_until(lambda: (d := metrics())["sent"] == 2 and d["errors"] == 1 and d, timeout=30,
                      what="metrics to count 2 sent + 1 error")
    assert data["window"] == "24h"

    # the seed's Prometheus series on the public /metrics, labelled by tenant and account
    labels = f'{{tenant_id="{t.id}",account_id="main"}}'
    # served from a snapshot refreshed every few seconds (POSTBUS_API_METRICS_SNAPSHOT_S)
    def scrape() -> str | None:
        text = httpx.get(f"{t.http.base_url}/metrics").text
        return text if f"gmp_sent_total{labels} 2.0" in text else None

    text = wait_until(scrape, timeout=15, what="the /metrics snapshot")
    assert f"gmp_sent_total{labels} 2.0" in text
    assert f"gmp_errors_total{labels} 1.0" in text
    assert f"gmp_deferred_total{labels} 0.0" in text and f"gmp_rate_limited_total{labels} 0.0" in text
    assert "gmp_pending_messages " in text


def test_pending_id_resent_replaces_and_sent_id_is_never_resent(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    future = 4102444800  # far in the future: stays pending
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("r-1", subject="v1", deferred_ts=future)]})
    assert r.json()["queued"] == 1
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("r-1", subject="v2")]})
    assert r.json()["queued"] == 1
    wait_until(lambda: _tenant_mail(smtp, t.id), what="the replacement to be sent")
    wait_until(lambda: any(x["id"] == "r-1" and "sent_ts" in x for x in t.client.reports()), what="sent report")
    # the sent id, submitted again: an idempotent retry (genro 0.6: 200, queued 0), never sent twice
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("r-1", subject="v3")]})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "queued": 0,
                        "rejected": [{"id": "r-1", "reason": "already sent", "code": "already_sent"}]}
    mails = _tenant_mail(smtp, t.id)
    assert [m.message["Subject"] for m in mails] == ["v2"]


def test_priority_zero_is_reported_and_validation_reasons(new_tenant) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("ok-1", priority="immediate"),
        {"id": "no-tenant"},
        t.message("bad-to", to=["nope"]),
        t.message("no-account", account_id="ghost"),
    ]})
    assert r.status_code == 200
    body = r.json()
    assert body["queued"] == 1
    assert {x["id"]: x["reason"] for x in body["rejected"]} == {
        "no-tenant": "missing tenant_id",
        "bad-to": "invalid address in to: 'nope'",
        "no-account": "account not found for tenant",
    }
    r = t.http.post("/commands/add-messages", json={"messages": [{"tenant_id": t.id}]})
    assert r.status_code == 400 and r.json()["rejected"] == [{"id": None, "reason": "missing id"}]
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(f"x{i}") for i in range(1001)]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"


def test_tenant_isolation(new_tenant, admin: httpx.Client) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    # a's key cannot create accounts or queue mail for b
    r = a.http.post("/account", json={"id": "evil", "tenant_id": b.id, "host": "127.0.0.1", "port": 25})
    assert r.status_code == 401 and r.json()["error"]["code"] == "tenant_mismatch"
    r = a.http.post("/commands/add-messages", json={"messages": [b.message("steal")]})
    assert r.status_code == 401
    # ... nor use b's account through its own tenant id
    r = a.http.post("/commands/add-messages", json={"messages": [a.message("x", account_id="evil")]})
    assert r.status_code == 400 and r.json()["rejected"][0]["reason"] == "account not found for tenant"
    # ... nor read b's SMTP metrics
    r = a.http.get(f"/api/v1/tenants/{b.id}/smtp/metrics", headers={"Authorization": f"Bearer {a.api_key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "INSUFFICIENT_PERMISSIONS"
    # admin-only routes answer 403 to a tenant key
    r = a.http.post("/tenant", json={"id": "newco"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    # no token / a bad token
    assert httpx.post(f"{admin.base_url}/commands/run-now").status_code == 401
    r = httpx.post(f"{admin.base_url}/commands/run-now", headers={"X-API-Token": "pbk_0000000000000000_nope"})
    assert r.status_code == 401
    r = httpx.get(f"{admin.base_url}/api/v1/tenants/{a.id}/smtp/metrics")
    assert r.status_code == 401 and r.json() == {
        "success": False, "error": {"code": "AUTHENTICATION_REQUIRED", "message": r.json()["error"]["message"]}}


def test_create_tenant_returns_key_once_and_secrets_never_come_back(admin: httpx.Client, system) -> None:
    r = admin.post("/tenant", json={"id": "secretive", "client_base_url": "http://127.0.0.1:1",
                                    "client_auth": {"method": "bearer", "token": "TOPSECRET-TOKEN"}})
    assert r.status_code == 200 and r.json()["api_key"].startswith("pbk_")
    again = admin.post("/tenant", json={"id": "secretive", "name": "renamed"})
    assert again.status_code == 200 and again.json()["api_key"] is None and again.json()["created"] is False
    key = r.json()["api_key"]
    r = httpx.post(f"{admin.base_url}/account", headers={"X-API-Token": key},
                   json={"id": "acc", "host": "127.0.0.1", "port": 2525, "password": "SMTP-PASSWORD-XYZ"})
    assert r.status_code == 200 and "SMTP-PASSWORD-XYZ" not in r.text
    # nothing secret in any service log
    for name in ("api", "sender", "reporter", "metrics"):
        text = system.log_path(name).read_text(errors="replace")
        assert "TOPSECRET-TOKEN" not in text and "SMTP-PASSWORD-XYZ" not in text and key not in text
