"""Sending domains in the sender, against the running system: DKIM signature of mail from a verified
domain (verified with dkimpy against the published key), exact counting of sent mail in the domain
ledger, hard caps refused by the sender, automatic suspension on the bounce rate with its evidence,
and the tenant SMTP config's from_domains."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from infra.supervisor import LocalSystem
from services.common.avro import codec
from services.common.topics import EVENTS
from services.sender.dkim_core import verify
from tests.conftest import Tenant, wait_until
from tests.integration.test_domains import _Zone, dns_api, verify_domain  # noqa: F401  (module fixture: DNS + API)
from tests.support.smtp_server import FailFirst, RecordingSmtpServer

pytestmark = pytest.mark.integration


def domain() -> str:
    return f"s{uuid.uuid4().hex[:10]}.example.test"


def mail_of(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> Any:
    got = [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id
           and m.message["X-Postbus-Message-Id"] == mid]
    return got[0] if got else None


def final_report(t: Tenant, mid: str) -> dict[str, Any] | None:
    for r in t.client.reports():
        if r["id"] == mid and ("sent_ts" in r or "error_ts" in r):
            return r
    return None


def send(t: Tenant, mid: str, sender: str, **kw: Any) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid, **{"from": sender}, **kw)]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text


def outbound(t: Tenant, name: str) -> dict[str, Any]:
    r = t.http.get(f"/domains/{name}/outbound")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_mail_from_a_verified_domain_is_dkim_signed_and_counted_once(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    url, zone = dns_api
    t = new_tenant()
    name = domain()
    with httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30) as http:
        wait_until(lambda: http.get(f"/domains/{name}/outbound").status_code == 404, timeout=60, what="key visible")
        assert http.put(f"/domains/{name}/outbound", json={}).status_code == 200
        body = http.post(f"/domains/{name}/ses-verify").json()
        with zone.lock:
            for rec in body["dns_records"]:
                zone.txt[rec["name"]] = [rec["value"]]
        assert http.get(f"/domains/{name}/ses-status").json()["ses_verified"] is True
    selector = body["ses_dkim_tokens"][0]
    key_txt = next(r["value"] for r in body["dns_records"] if r["name"] == f"{selector}._domainkey.{name}")

    # the tenant SMTP config lists the domain with its DKIM status
    wait_until(lambda: t.http.get(f"/domains/{name}/outbound").json()["ses_verified"], timeout=60, what="verified")
    # (read through the API that resolves against the test's DNS server: SPF/DMARC come from DNS)
    with zone.lock:
        zone.txt[name] = ["v=spf1 ip4:127.0.0.1 -all"]
        zone.txt[f"_dmarc.{name}"] = ["v=DMARC1; p=none"]
    cfg = httpx.get(f"{url}/api/v1/tenants/{t.id}/smtp/config", headers={"Authorization": f"Bearer {t.api_key}"},
                    timeout=30)
    assert cfg.status_code == 200, cfg.text
    (entry,) = [d for d in cfg.json()["data"]["from_domains"] if d["domain"] == name]
    assert entry["dkim_status"] == "verified" and entry["tracking_domain"] is None
    assert (entry["spf_status"], entry["dmarc_status"]) == ("verified", "configured")

    smtp.replies["slow-bob@example.test"] = FailFirst(1)  # one retry: still counted once
    send(t, "signed-1", f"News <news@{name}>", to=["slow-bob@example.test"])
    send(t, "plain-1", f"app@{t.id}.test")
    signed = wait_until(lambda: mail_of(smtp, t.id, "signed-1"), timeout=60, what="signed mail")
    plain = wait_until(lambda: mail_of(smtp, t.id, "plain-1"), timeout=60, what="plain mail")

    assert signed.data.startswith(b"DKIM-Signature:")
    sig = signed.message["DKIM-Signature"]
    tags = dict(p.strip().split("=", 1) for p in "".join(sig.split()).split(";") if "=" in p)
    assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (name, selector, "relaxed/relaxed", "rsa-sha256")
    assert verify(signed.data, selector, name, key_txt)
    assert not verify(signed.data.replace(b"Body of signed-1", b"Body of forged-1"), selector, name, key_txt)
    assert plain.message["DKIM-Signature"] is None  # not a registered domain of the tenant: unsigned

    wait_until(lambda: outbound(t, name)["outbound_sent_today"] == 1, timeout=60, what="sent counted")
    got = outbound(t, name)
    assert (got["outbound_sent_today"], got["outbound_sent_month"]) == (1, 1)


@pytest.mark.parametrize("enforcement", ["hard", "soft"])
def test_sender_applies_the_domain_quota(new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer,
                                         admin: httpx.Client, dns_api: tuple[str, _Zone],  # noqa: F811
                                         enforcement: str) -> None:
    t = new_tenant()
    name = domain()
    assert t.http.put(f"/domains/{name}/outbound", json={}).status_code == 200  # the tenant registers it
    verify_domain(t, dns_api, name)  # outbound email is blocked until the domain is verified
    # quotas and enforcement are the operator's (services/api/field_policy.py)
    r = admin.put(f"/domains/{name}/outbound", json={"outbound_daily_limit": 2, "outbound_enforcement": enforcement})
    assert r.status_code == 200, r.text
    for i in (1, 2):
        send(t, f"q-{i}", f"app@{name}")
        wait_until(lambda i=i: outbound(t, name)["outbound_sent_today"] == i, timeout=60, what=f"{i} counted")
    send(t, "q-3", f"app@{name}")
    report = wait_until(lambda: final_report(t, "q-3"), timeout=60, what="q-3 final")
    if enforcement == "hard":
        assert "error_ts" in report and report["error"].startswith("daily_limit_exceeded"), report
        assert mail_of(smtp, t.id, "q-3") is None
        assert outbound(t, name)["outbound_sent_today"] == 2
        # the limit lifted: mail goes again
        assert admin.put(f"/domains/{name}/outbound", json={"outbound_daily_limit": 0}).status_code == 200
        send(t, "q-4", f"app@{name}")
        wait_until(lambda: mail_of(smtp, t.id, "q-4"), timeout=60, what="q-4 sent")
    else:  # soft: sent and counted (billed) over the limit
        assert "sent_ts" in report, report
        wait_until(lambda: outbound(t, name)["outbound_sent_today"] == 3, timeout=60, what="3 counted")


async def _produce(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(EVENTS, key=e["tenant_id"].encode(), value=codec().encode("DeliveryEvent", e))
                   for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _event(t: Tenant, name: str, etype: str, i: int, ts: int, **kw: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "type": etype, "tenant_id": t.id, "account_id": t.account_id,
            "message_id": f"synthetic-{i}", "pk": None, "ts": ts, "accepted_ts": ts, "attempt": 1,
            "smtp_code": None, "error": None, "deferred_reason": None, "deferred_until": None, "batch_code": None,
            "sender_domain": name, "recipients": 1, **kw}


def test_bounce_rate_suspends_the_domain_with_evidence(system: LocalSystem, new_tenant: Callable[..., Tenant],
                                                      smtp: RecordingSmtpServer, admin: httpx.Client,
                                                      dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    t = new_tenant()
    name = domain()
    assert t.http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    verify_domain(t, dns_api, name)  # outbound email is blocked until the domain is verified
    ts = int(__import__("time").time() * 1000)
    # 100 sent (the minimum volume) and 3 DSN bounces: 3.0 % is not above the 3 % threshold
    sent = [_event(t, name, "sent", i, ts) for i in range(100)]
    bounces = [_event(t, name, "bounce", i, ts, recipient=f"u{i}@example.test", bounce_type="hard",
                      bounce_code="5.1.1", source="dsn-smtp") for i in range(3)]
    asyncio.run(_produce(system.kafka_bootstrap, sent + bounces))
    wait_until(lambda: (o := outbound(t, name))["outbound_sent_month"] == 100 and o["bounce_count"] == 3,
               timeout=60, what="counted")
    got = outbound(t, name)
    assert got["outbound_status"] == "active" and got["suspension_evidence"] is None
    # SES feedback comes as domain.feedback commands: an SES bounce event is not counted twice here
    asyncio.run(_produce(system.kafka_bootstrap, [_event(t, name, "bounce", 99, ts, source="ses")]))
    asyncio.run(_produce(system.kafka_bootstrap, [_event(t, name, "bounce", 3, ts, source="dsn-smtp")]))
    got = wait_until(lambda: (o := outbound(t, name))["outbound_status"] == "suspended" and o, timeout=60,
                     what="suspended")
    assert got["bounce_count"] == 4
    ev = got["suspension_evidence"]
    assert ev["reason"] == "bounce_rate_exceeded" and ev["window"].startswith("month ")
    assert (ev["sent_count"], ev["bounce_count"], ev["bounce_rate"], ev["threshold"], ev["min_volume"]) == (
        100, 4, 4.0, 3.0, 100)

    # the sender refuses mail from a suspended domain, and a partial update keeps the suspension
    send(t, "after-suspension", f"app@{name}")
    report = wait_until(lambda: final_report(t, "after-suspension"), timeout=60, what="refused")
    assert "error_ts" in report and report["error"].startswith("outbound_suspended"), report
    assert mail_of(smtp, t.id, "after-suspension") is None
    r = admin.put(f"/domains/{name}/outbound", json={"outbound_daily_limit": 1000})
    assert r.json()["outbound_status"] == "suspended"
    # the tenant cannot lift its own suspension (admin-only field) ...
    r = t.http.put(f"/domains/{name}/outbound", json={"outbound_status": "active"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only_field", r.text
    assert outbound(t, name)["outbound_status"] == "suspended"
    # ... the operator re-activates it: the evidence goes, mail flows again
    r = admin.put(f"/domains/{name}/outbound", json={"outbound_status": "active"})
    assert r.json()["outbound_status"] == "active"
    wait_until(lambda: outbound(t, name)["suspension_evidence"] is None, timeout=60, what="evidence cleared")
    send(t, "after-activation", f"app@{name}")
    wait_until(lambda: mail_of(smtp, t.id, "after-activation"), timeout=60, what="sent again")
