"""Issue 8, finding 9: domain squatting. Ownership of a sending domain is a projection of the domain
records (services/common/domain_quota.py): a domain verified by one tenant cannot be registered or
used as a From domain by another (``sender_domain_not_owned``, at the API and again in the sender);
mail From a registered but unverified domain is blocked (``sender_domain_not_verified``); an
unverified claim blocks nobody's mail, is released to another tenant that proves DNS control, and
expires (``POSTBUS_DOMAIN_CLAIM_EXPIRY_HOURS``; the expiry rule itself with an injected clock is in
tests/unit/test_domain_ownership.py).

Runs against the session ``system``; verification goes through a second API process resolving
against a DNS server on loopback that the test controls (tests/integration/test_domains.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from infra.supervisor import LocalSystem
from services.api.commands import Actor, CommandWriter
from services.api.message_validation import validate_message
from services.common.topics import COMMANDS
from tests.conftest import Tenant, wait_until
from tests.integration.test_domains import _Zone, dns_api, extra_api, verify_domain  # noqa: F401  (fixture)
from tests.support.smtp_server import RecordingSmtpServer

pytestmark = pytest.mark.integration
CLAIM_EXPIRY_S = 12.0


def domain() -> str:
    return f"sq{uuid.uuid4().hex[:10]}.example.test"


def mail_of(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> Any:
    got = [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id
           and m.message["X-Postbus-Message-Id"] == mid]
    return got[0] if got else None


def mails_of(smtp: RecordingSmtpServer, tenant_id: str) -> list[Any]:
    return [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id]


def final_report(t: Tenant, mid: str) -> dict[str, Any] | None:
    for r in t.client.reports():
        if r["id"] == mid and ("sent_ts" in r or "error_ts" in r):
            return r
    return None


def queue(t: Tenant, *msgs: dict[str, Any]) -> httpx.Response:
    return t.http.post("/commands/add-messages", json={"messages": list(msgs)})


def outbound(t: Tenant, name: str) -> dict[str, Any]:
    r = t.http.get(f"/domains/{name}/outbound")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert body["ok"] is False, r.text
    return str(body["error"]["code"])


@pytest.fixture(scope="module")
def short_expiry_api(system: LocalSystem) -> Iterator[str]:
    """An API process of the same system whose unverified claims expire after CLAIM_EXPIRY_S."""
    with extra_api(system, "api-short-claims",
                   POSTBUS_DOMAIN_CLAIM_EXPIRY_HOURS=str(CLAIM_EXPIRY_S / 3600)) as url:
        yield url


def test_a_domain_verified_by_one_tenant_cannot_be_registered_by_another(
        new_tenant: Callable[..., Tenant], admin: httpx.Client, dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    a, b = new_tenant(), new_tenant()
    name = domain()
    # positive control: B can register a domain nobody holds
    assert b.http.put(f"/domains/{domain()}/outbound", json={}).status_code == 200
    verify_domain(a, dns_api, name)
    before = outbound(a, name)

    for r in (b.http.put(f"/domains/{name}/outbound", json={}),
              b.http.put(f"/domains/{name.upper()}/outbound", json={}),
              b.http.post(f"/domains/{name}/ses-verify"),
              b.http.get(f"/domains/{name}/ses-status"),
              admin.put(f"/domains/{name}/outbound", json={"tenant_id": b.id})):
        assert r.status_code == 409, r.text
        assert error_code(r) == "sender_domain_not_owned"
        assert "PRIVATE" not in r.text and a.id not in r.text  # nothing about the owner leaks
    # nothing was recorded for B, and A's domain is untouched
    assert b.http.get(f"/domains/{name}/outbound").status_code == 404
    assert outbound(a, name) == before and before["ses_verified"] is True


def test_another_tenant_cannot_send_from_a_verified_domain(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    a, b = new_tenant(), new_tenant()
    name = domain()
    verify_domain(a, dns_api, name)
    # positive control: the owner's mail From the domain is delivered (and counted for it)
    r = queue(a, a.message("own-1", **{"from": f"News <news@{name}>"}))
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    wait_until(lambda: mail_of(smtp, a.id, "own-1"), timeout=60, what="A's mail delivered")
    wait_until(lambda: outbound(a, name)["outbound_sent_today"] == 1, timeout=60, what="A's mail counted")

    # the attack: B's mail From the domain, and From a name under it, in one call with a control
    r = queue(b, b.message("spoof-1", **{"from": f"Support <support@{name}>"}),
              b.message("spoof-2", **{"from": f"ceo@mail.{name}"}),
              b.message("control-1"))  # From B's own (unregistered) domain
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["queued"] == 1
    reasons = {x["id"]: x["reason"] for x in body["rejected"]}
    assert set(reasons) == {"spoof-1", "spoof-2"}
    assert all(reason.startswith("sender_domain_not_owned") for reason in reasons.values()), reasons
    # only the attack in a call: 400 all_rejected, nothing queued
    r = queue(b, b.message("spoof-3", **{"from": f"news@{name.upper()}"}))
    assert r.status_code == 400 and error_code(r) == "all_rejected", r.text
    assert r.json()["rejected"][0]["reason"].startswith("sender_domain_not_owned")

    wait_until(lambda: mail_of(smtp, b.id, "control-1"), timeout=60, what="B's control mail delivered")
    report = wait_until(lambda: final_report(b, "spoof-1"), timeout=60, what="B told of the refusal")
    assert report["error"].startswith("sender_domain_not_owned"), report
    assert [m.message["X-Postbus-Message-Id"] for m in mails_of(smtp, b.id)] == ["control-1"]
    assert outbound(a, name)["outbound_sent_today"] == 1  # nothing of B's counted on A's domain


async def _bypass_api(bootstrap: str, msg: dict[str, Any]) -> None:
    """A messages.add command appended straight to the log (what the API would write), so only the
    sender's own check stands between it and the SMTP server."""
    _, value = CommandWriter.envelope("messages.add", msg["tenant_id"], Actor("tenant", msg["tenant_id"]),
                                      "POST /commands/add-messages", "AddMessages", {"messages": [msg]})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(COMMANDS, value=value, key=msg["tenant_id"].encode())
    finally:
        await producer.stop()


def _valid(raw: dict[str, Any]) -> dict[str, Any]:
    return validate_message(raw, default_priority=2, account_exists=lambda t, a: True,
                            tenant_exists=lambda t: True, now_ms=int(time.time() * 1000))


def test_the_sender_refuses_it_even_when_the_api_is_bypassed(
        system: LocalSystem, new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer,
        dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    a, b = new_tenant(), new_tenant()
    name, unverified = domain(), domain()
    verify_domain(a, dns_api, name)
    assert b.http.put(f"/domains/{unverified}/outbound", json={}).status_code == 200
    # positive control: a command on the same path, From B's own unregistered domain, is delivered
    asyncio.run(_bypass_api(system.kafka_bootstrap, _valid(b.message("direct-ok"))))
    wait_until(lambda: mail_of(smtp, b.id, "direct-ok"), timeout=60, what="direct command delivered")
    # the attacks: From A's verified domain, and From B's own unverified one
    asyncio.run(_bypass_api(system.kafka_bootstrap, _valid(b.message("direct-spoof", **{"from": f"x@{name}"}))))
    asyncio.run(_bypass_api(system.kafka_bootstrap,
                            _valid(b.message("direct-unverified", **{"from": f"x@{unverified}"}))))
    spoof = wait_until(lambda: final_report(b, "direct-spoof"), timeout=60, what="spoof refused")
    assert "error_ts" in spoof and spoof["error"].startswith("sender_domain_not_owned"), spoof
    early = wait_until(lambda: final_report(b, "direct-unverified"), timeout=60, what="unverified refused")
    assert "error_ts" in early and early["error"].startswith("sender_domain_not_verified"), early
    assert mail_of(smtp, b.id, "direct-spoof") is None and mail_of(smtp, b.id, "direct-unverified") is None
    assert outbound(a, name)["outbound_sent_today"] == 0


def test_a_registered_domain_sends_nothing_until_verified(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    url, zone = dns_api
    t = new_tenant()
    name = domain()
    assert t.http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    msg = t.message("early-1", **{"from": f"app@{name}"})
    r = queue(t, msg)
    assert r.status_code == 400 and error_code(r) == "all_rejected", r.text
    reason = r.json()["rejected"][0]["reason"]
    assert reason.startswith("sender_domain_not_verified") and "blocked until the domain is verified" in reason
    report = wait_until(lambda: final_report(t, "early-1"), timeout=60, what="the tenant told of the refusal")
    assert report["error"].startswith("sender_domain_not_verified"), report
    assert mail_of(smtp, t.id, "early-1") is None
    # control: verified, then the same message queued at once through the same API process
    # (read-your-writes), is delivered
    with httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30) as http:
        wait_until(lambda: http.get(f"/domains/{name}/outbound").status_code == 200, timeout=60, what="seen")
        body = http.post(f"/domains/{name}/ses-verify").json()
        with zone.lock:
            for rec in body["dns_records"]:
                zone.txt[rec["name"]] = [rec["value"]]
        assert http.get(f"/domains/{name}/ses-status").json()["ses_verified"] is True
        r = http.post("/commands/add-messages", json={"messages": [msg]})
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    wait_until(lambda: mail_of(smtp, t.id, "early-1"), timeout=60, what="delivered once verified")


def test_an_unverified_claim_blocks_nobody_and_dns_proof_releases_it(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone]) -> None:  # noqa: F811
    url, zone = dns_api
    squatter, owner = new_tenant(), new_tenant()
    name = domain()
    assert squatter.http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    squatter_token = squatter.http.post(f"/domains/{name}/ses-verify").json()["ses_verification_token"]

    # the claim blocks the real owner's registration for now ...
    r = owner.http.put(f"/domains/{name}/outbound", json={})
    assert r.status_code == 409 and error_code(r) == "domain_claim_pending", r.text
    # ... but not its mail: an unverified claim grants nothing
    r = queue(owner, owner.message("owner-1", **{"from": f"hello@{name}"}))
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    wait_until(lambda: mail_of(smtp, owner.id, "owner-1"), timeout=60, what="the owner's mail delivered")
    # and the squatter itself sends nothing From it
    r = queue(squatter, squatter.message("squat-1", **{"from": f"hello@{name}"}))
    assert r.status_code == 400 and r.json()["rejected"][0]["reason"].startswith("sender_domain_not_verified")

    # the real owner proves DNS control with a challenge token of its own
    challenge = owner.http.post(f"/domains/{name}/ses-verify")
    assert challenge.status_code == 200, challenge.text
    token = challenge.json()["ses_verification_token"]
    assert token != squatter_token
    with httpx.Client(base_url=url, headers={"X-API-Token": owner.api_key}, timeout=30) as http:
        wait_until(lambda: http.get(f"/domains/{name}/ses-status").status_code == 200, timeout=60, what="key seen")
        # the squatter's own token in DNS proves nothing for the owner: still the squatter's claim
        with zone.lock:
            zone.txt[f"_amazonses.{name}"] = [squatter_token]
        r = http.get(f"/domains/{name}/ses-status")
        assert r.status_code == 200 and r.json()["verification_status"] == "Failed", r.text
        assert squatter.http.get(f"/domains/{name}/outbound").status_code == 200
        with zone.lock:
            zone.txt[f"_amazonses.{name}"] = [squatter_token, token]
        r = http.get(f"/domains/{name}/ses-status")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": name, "ses_verified": False, "verification_status": "Success",
                            "dkim_status": "Pending"}
    # released: the squatter's claim is gone, the domain is the owner's to finish verifying
    wait_until(lambda: squatter.http.get(f"/domains/{name}/outbound").status_code == 404, timeout=30,
               what="the squatter's claim released")
    body = verify_domain(owner, dns_api, name)
    assert body["ses_verification_token"] == token and len(body["ses_dkim_tokens"]) == 3
    # now the squatter can neither take it back nor send From it
    r = squatter.http.put(f"/domains/{name}/outbound", json={})
    assert r.status_code == 409 and error_code(r) == "sender_domain_not_owned", r.text
    r = queue(squatter, squatter.message("squat-2", **{"from": f"hello@{name}"}))
    assert r.status_code == 400 and r.json()["rejected"][0]["reason"].startswith("sender_domain_not_owned")
    # the ledger followed: the owner's mail From its domain is counted for it
    r = queue(owner, owner.message("owner-2", **{"from": f"hello@{name}"}))
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    wait_until(lambda: mail_of(smtp, owner.id, "owner-2"), timeout=60, what="owner's verified mail")
    wait_until(lambda: outbound(owner, name)["outbound_sent_today"] == 1, timeout=60, what="counted for the owner")
    assert mail_of(smtp, squatter.id, "squat-1") is None and mail_of(smtp, squatter.id, "squat-2") is None


def test_an_expired_claim_can_be_taken_over(new_tenant: Callable[..., Tenant], short_expiry_api: str) -> None:
    squatter, owner = new_tenant(), new_tenant()
    name = domain()
    assert squatter.http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    claimed = time.monotonic()
    r = squatter.http.post(f"/domains/{name}/outbound/increment")  # the squatter's own count, before
    assert r.status_code == 200 and r.json()["outbound_sent_today"] == 1, r.text
    with httpx.Client(base_url=short_expiry_api, headers={"X-API-Token": owner.api_key}, timeout=30) as http:
        wait_until(lambda: http.get(f"/domains/{name}/outbound").status_code == 404, timeout=60, what="key seen")
        r = http.put(f"/domains/{name}/outbound", json={})
        if time.monotonic() - claimed < CLAIM_EXPIRY_S - 2:  # the refusal while the claim is live
            assert r.status_code == 409 and error_code(r) == "domain_claim_pending", r.text
        time.sleep(max(0.0, CLAIM_EXPIRY_S + 1 - (time.monotonic() - claimed)))  # the claim's lifetime
        r = http.put(f"/domains/{name}/outbound", json={})
        assert r.status_code == 200, r.text
        assert r.json()["ses_verified"] is False and r.json()["outbound_sent_today"] == 0
    # the domain is the new tenant's everywhere, and the ledger moved with it
    wait_until(lambda: squatter.http.get(f"/domains/{name}/outbound").status_code == 404, timeout=30,
               what="the expired claim released")
    assert owner.http.get(f"/domains/{name}/outbound").status_code == 200
    r = owner.http.post(f"/domains/{name}/outbound/increment")
    assert r.status_code == 200 and r.json()["outbound_sent_today"] == 1, r.text  # its own count, from zero
    assert squatter.http.post(f"/domains/{name}/outbound/increment").status_code == 404
    # on the main API (72 h) the squatter's claim is not coming back: the name is the owner's claim now
    r = squatter.http.put(f"/domains/{name}/outbound", json={})
    assert r.status_code == 409 and error_code(r) == "domain_claim_pending", r.text
