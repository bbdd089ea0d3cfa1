"""Outbound domain API (seed: outbound-email-domain-api) over HTTP against the running system:
registration, limits with every documented reason, exact counters under concurrency, resets with
frozen billing values, tenant isolation, and native verification checked against a DNS server on
loopback that the test controls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from dnslib import QTYPE, RR, TXT
from dnslib.server import BaseResolver, DNSServer

from infra.supervisor import LocalSystem, free_port
from tests.conftest import ADMIN_TOKEN, Tenant, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
OUTBOUND_FIELDS = {"name", "outbound_tier", "outbound_status", "outbound_daily_limit", "outbound_monthly_limit",
                   "outbound_sent_today", "outbound_sent_month", "outbound_enforcement", "bounce_count",
                   "complaint_count", "bounce_rate", "complaint_rate", "ses_verified", "suspension_evidence"}


def domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.test"


def register(t: Tenant, name: str, **fields: Any) -> dict[str, Any]:
    """The tenant registers its domain; limits, tier, enforcement and status are set by the admin
    (admin-only fields, services/api/field_policy.py)."""
    if t.http.get(f"/domains/{name}/outbound").status_code == 404:
        r = t.http.put(f"/domains/{name}/outbound", json={})
        assert r.status_code == 200, r.text
        if not fields:
            return r.json()
    with httpx.Client(base_url=t.http.base_url, headers={"X-API-Token": ADMIN_TOKEN}, timeout=30) as admin:
        r = admin.put(f"/domains/{name}/outbound", json=fields)
    assert r.status_code == 200, r.text
    return r.json()


def inc(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.post(f"/domains/{name}/outbound/increment")
    assert r.status_code == 200, r.text
    return r.json()


def test_register_defaults_and_partial_update(new_tenant: Callable[..., Tenant], admin: httpx.Client) -> None:
    t = new_tenant()
    name = domain()
    assert t.http.get(f"/domains/{name}/outbound").status_code == 404
    created = register(t, name)
    assert set(created) == OUTBOUND_FIELDS
    assert created == {"name": name, "outbound_tier": "shared", "outbound_status": "active",
                       "outbound_daily_limit": 0, "outbound_monthly_limit": 0, "outbound_sent_today": 0,
                       "outbound_sent_month": 0, "outbound_enforcement": "soft", "bounce_count": 0,
                       "complaint_count": 0, "bounce_rate": 0.0, "complaint_rate": 0.0, "ses_verified": False,
                       "suspension_evidence": None}
    updated = register(t, name, outbound_daily_limit=500, outbound_monthly_limit=10000)
    assert (updated["outbound_daily_limit"], updated["outbound_monthly_limit"]) == (500, 10000)
    updated = register(t, name, outbound_tier="dedicated", outbound_enforcement="hard")
    assert updated["outbound_daily_limit"] == 500  # untouched by a partial update
    assert (updated["outbound_tier"], updated["outbound_enforcement"]) == ("dedicated", "hard")
    assert t.http.get(f"/domains/{name.upper()}/outbound").json() == updated  # names are case-insensitive
    assert admin.get(f"/domains/{name}/outbound").json() == updated

    for bad in ({"outbound_tier": "gold"}, {"outbound_daily_limit": -1}, {"outbound_enforcement": "maybe"},
                {"outbound_status": "paused"}):
        r = t.http.put(f"/domains/{name}/outbound", json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["ok"] is False
    r = t.http.get("/domains/not_a_domain/outbound")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_domain"

    # the admin registers for a named tenant only
    other = domain()
    r = admin.put(f"/domains/{other}/outbound", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_tenant_id"
    r = admin.put(f"/domains/{other}/outbound", json={"tenant_id": "no-such-tenant"})
    assert r.status_code == 404
    r = admin.put(f"/domains/{other}/outbound", json={"tenant_id": t.id, "outbound_daily_limit": 7})
    assert r.status_code == 200 and r.json()["outbound_daily_limit"] == 7
    assert t.http.get(f"/domains/{other}/outbound").json()["outbound_daily_limit"] == 7


def test_tenant_isolation(new_tenant: Callable[..., Tenant], admin: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    name = domain()
    register(a, name)
    assert admin.put(f"/domains/{name}/outbound", json={"outbound_daily_limit": 5}).status_code == 200
    inc(a.http, name)
    a_token = a.http.post(f"/domains/{name}/ses-verify").json()["ses_verification_token"]
    for method, path in (("GET", "outbound"), ("POST", "outbound/increment"), ("GET", "dkim"),
                         ("POST", "dkim/rotate")):
        r = b.http.request(method, f"/domains/{name}/{path}")
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "domain_not_found"
    # registering a name another tenant claims (unverified, not expired): refused, with the way out
    r = b.http.put(f"/domains/{name}/outbound", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "domain_claim_pending", r.text
    # ... which is proving DNS control with a token of its own (A's token proves nothing about B)
    challenge = b.http.post(f"/domains/{name}/ses-verify")
    assert challenge.status_code == 200, challenge.text
    assert challenge.json()["ses_verification_token"] != a_token and challenge.json()["ses_dkim_tokens"] == []
    assert "PRIVATE" not in challenge.text
    r = b.http.get(f"/domains/{name}/ses-status")  # nothing published for B: still A's claim
    assert r.status_code == 200 and r.json()["verification_status"] != "Success", r.text
    assert a.http.get(f"/domains/{name}/outbound").status_code == 200
    r = b.http.put(f"/domains/{domain()}/outbound", json={"tenant_id": a.id})
    assert r.status_code == 401 and r.json()["error"]["code"] == "tenant_mismatch"
    for path in ("/outbound/reset-daily", "/outbound/reset-monthly"):
        assert a.http.post(path).status_code == 403
    assert httpx.post(f"{str(a.http.base_url).rstrip('/')}/domains/{name}/outbound/increment").status_code == 401
    after = a.http.get(f"/domains/{name}/outbound").json()
    assert (after["outbound_sent_today"], after["outbound_daily_limit"]) == (1, 5)  # nothing B did counted


@pytest.mark.parametrize("enforcement", ["hard", "soft"])
def test_limits_and_reasons(new_tenant: Callable[..., Tenant], enforcement: str) -> None:
    t = new_tenant()
    name = domain()
    register(t, name, outbound_daily_limit=2, outbound_enforcement=enforcement)
    assert inc(t.http, name) == {"name": name, "outbound_sent_today": 1, "outbound_sent_month": 1,
                                 "allowed": True, "reason": None}
    assert inc(t.http, name)["reason"] is None
    third = inc(t.http, name)
    sent = 2 if enforcement == "hard" else 3
    if enforcement == "hard":
        assert (third["allowed"], third["reason"]) == (False, "daily_limit_exceeded")
    else:
        assert (third["allowed"], third["reason"]) == (True, "daily_limit_exceeded_soft")
    assert (third["outbound_sent_today"], third["outbound_sent_month"]) == (sent, sent)

    register(t, name, outbound_daily_limit=0, outbound_monthly_limit=sent + 1)
    assert inc(t.http, name)["reason"] is None
    fourth = inc(t.http, name)
    if enforcement == "hard":
        assert (fourth["allowed"], fourth["reason"], fourth["outbound_sent_month"]) == (
            False, "monthly_limit_exceeded", sent + 1)
    else:
        assert (fourth["allowed"], fourth["reason"], fourth["outbound_sent_month"]) == (
            True, "monthly_limit_exceeded_soft", sent + 2)

    register(t, name, outbound_monthly_limit=0, outbound_status="suspended")
    fifth = inc(t.http, name)
    expected = (False, "outbound_suspended") if enforcement == "hard" else (True, "outbound_suspended_soft")
    assert (fifth["allowed"], fifth["reason"]) == expected
    got = t.http.get(f"/domains/{name}/outbound").json()
    assert got["outbound_sent_today"] == fifth["outbound_sent_today"]
    assert got["outbound_sent_month"] == fifth["outbound_sent_month"]
    register(t, name, outbound_status="active")
    assert inc(t.http, name)["reason"] is None


def test_concurrent_increments_are_exact(new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    name = domain()
    register(t, name, outbound_daily_limit=30, outbound_enforcement="hard")

    async def burst() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=str(t.http.base_url), headers={"X-API-Token": t.api_key},
                                     timeout=60) as c:
            responses = await asyncio.gather(*(c.post(f"/domains/{name}/outbound/increment") for _ in range(50)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    results = asyncio.run(burst())
    allowed = [r for r in results if r["allowed"]]
    assert len(allowed) == 30
    # every allowed call saw its own count: no lost or double increments
    assert sorted(r["outbound_sent_today"] for r in allowed) == list(range(1, 31))
    assert all(r["reason"] == "daily_limit_exceeded" and r["outbound_sent_today"] == 30
               for r in results if not r["allowed"])
    got = t.http.get(f"/domains/{name}/outbound").json()
    assert (got["outbound_sent_today"], got["outbound_sent_month"]) == (30, 30)


def test_reset_daily_and_monthly(new_tenant: Callable[..., Tenant], admin: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    da, db = domain(), domain()
    register(a, da, outbound_monthly_limit=100)
    register(b, db)
    for _ in range(3):
        inc(a.http, da)
    inc(b.http, db)

    r = admin.post("/outbound/reset-daily")
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"reset_count"} and r.json()["reset_count"] >= 2
    got = a.http.get(f"/domains/{da}/outbound").json()
    assert (got["outbound_sent_today"], got["outbound_sent_month"]) == (0, 3)
    assert inc(a.http, da)["outbound_sent_today"] == 1

    r = admin.post("/outbound/reset-monthly")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"frozen", "reset_count"} and body["reset_count"] >= 2
    frozen = {f["name"]: f for f in body["frozen"]}
    assert frozen[da] == {"name": da, "partner_ref": a.id, "outbound_sent_month": 4, "outbound_monthly_limit": 100,
                          "bounce_count": 0, "complaint_count": 0, "bounce_rate": 0.0, "complaint_rate": 0.0}
    assert frozen[db]["outbound_sent_month"] == 1 and frozen[db]["partner_ref"] == b.id
    # the monthly reset zeroes the month's counters; the day's counter is the daily reset's business
    got = a.http.get(f"/domains/{da}/outbound").json()
    assert (got["outbound_sent_today"], got["outbound_sent_month"], got["bounce_count"]) == (1, 0, 0)
    assert b.http.get(f"/domains/{db}/outbound").json()["outbound_sent_month"] == 0
    assert inc(a.http, da)["outbound_sent_month"] == 1


def test_ses_verify_shape(new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    name = domain()  # ses-verify with a tenant key registers the domain if needed
    r = t.http.post(f"/domains/{name}/ses-verify")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"name", "ses_verification_token", "ses_dkim_tokens", "ses_verified", "dns_records"}
    assert body["name"] == name and body["ses_verified"] is False and len(body["ses_dkim_tokens"]) == 3
    assert len(set(body["ses_dkim_tokens"])) == 3
    records = {rec["name"]: rec for rec in body["dns_records"]}
    assert len(records) == len(body["dns_records"]) == 4
    assert records[f"_amazonses.{name}"] == {"type": "TXT", "name": f"_amazonses.{name}",
                                              "value": body["ses_verification_token"]}
    keys = set()
    for selector in body["ses_dkim_tokens"]:  # the native backend publishes each DKIM key as a TXT record
        dkim = records[f"{selector}._domainkey.{name}"]
        assert dkim["type"] == "TXT" and dkim["value"].startswith("v=DKIM1; k=rsa; p=")
        key = load_der_public_key(base64.b64decode(dkim["value"].split("p=", 1)[1]))
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
        keys.add(dkim["value"])
    assert len(keys) == 3  # three keys, not one key under three names
    assert "PRIVATE" not in r.text
    again = t.http.post(f"/domains/{name}/ses-verify").json()
    assert again == body  # the same material until it is rotated
    assert t.http.get(f"/domains/{name}/outbound").json()["ses_verified"] is False


# --- verification against a DNS server on loopback -------------------------------------------------

class _Zone(BaseResolver):
    """TXT records the test publishes; everything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            values = list(self.txt.get(qname, []))
        if not values:
            reply.header.rcode = 3  # NXDOMAIN
            return reply
        if request.q.qtype == QTYPE.TXT:
            for v in values:
                chunks = [v[i:i + 255] for i in range(0, len(v), 255)]  # TXT strings are at most 255 bytes
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=1))
        return reply


@contextlib.contextmanager
def dns_server() -> Iterator[tuple[int, _Zone]]:
    """A DNS server on loopback answering the TXT records the test publishes in the zone."""
    zone = _Zone()
    port = free_port()
    server = DNSServer(zone, port=port, address="127.0.0.1", tcp=False)
    server.start_thread()
    try:
        yield port, zone
    finally:
        server.stop()


@contextlib.contextmanager
def extra_api(system: LocalSystem, log_name: str, **env_vars: str) -> Iterator[str]:
    """Another API process of the running system with settings of its own; yields its URL."""
    api_port = free_port()
    env = system.service_env()
    env.update(POSTBUS_API_PORT=str(api_port), **env_vars)
    log = (system.logs_dir / f"{log_name}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{api_port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the API process {log_name} exited"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=90, what=log_name)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def dns_api(system: LocalSystem) -> Iterator[tuple[str, _Zone]]:
    """A DNS server on loopback, and a second API process that resolves through it."""
    with dns_server() as (port, zone), extra_api(system, "api-dns", POSTBUS_DNS_RESOLVERS=f"127.0.0.1:{port}",
                                                 POSTBUS_DNS_TIMEOUT_S="2") as url:
        yield url, zone


def verify_domain(t: Tenant, dns: tuple[str, _Zone], name: str) -> dict[str, Any]:
    """Registers (if needed) and verifies ``name`` for ``t`` through the DNS-checking API: its
    records published in the test's zone; returns the ses-verify answer. Readable at once on the
    main API too (its reads of the domain catch up before refusing anything)."""
    url, zone = dns
    with httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30) as http:
        # the tenant's key was written through the main API: wait until this process has read it
        wait_until(lambda: http.get(f"/domains/{name}/outbound").status_code in (200, 404), timeout=60,
                   what="key visible")
        r = http.post(f"/domains/{name}/ses-verify")
        assert r.status_code == 200, r.text
        body = r.json()
        with zone.lock:
            for rec in body["dns_records"]:
                zone.txt[rec["name"]] = [*zone.txt.get(rec["name"], []), rec["value"]]
        r = http.get(f"/domains/{name}/ses-status")
        assert r.status_code == 200 and r.json()["ses_verified"] is True, r.text
    wait_until(lambda: t.http.get(f"/domains/{name}/outbound").json().get("ses_verified"), timeout=30,
               what="verified on the main API")
    return body  # type: ignore[no-any-return]


def test_ses_status_against_published_records(new_tenant: Callable[..., Tenant],
                                               dns_api: tuple[str, _Zone]) -> None:
    url, zone = dns_api
    t = new_tenant()
    name = domain()
    with httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30) as http:
        # the tenant's key was written through the main API: wait until this process has read it
        wait_until(lambda: http.get(f"/domains/{name}/outbound").status_code == 404, timeout=10, what="key visible")
        assert http.put(f"/domains/{name}/outbound", json={}).status_code == 200
        r = http.get(f"/domains/{name}/ses-status")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": name, "ses_verified": False, "verification_status": "NotStarted",
                            "dkim_status": "NotStarted"}
        body = http.post(f"/domains/{name}/ses-verify").json()
        records = {rec["name"]: rec["value"] for rec in body["dns_records"]}
        token_name = f"_amazonses.{name}"
        dkim_names = [f"{s}._domainkey.{name}" for s in body["ses_dkim_tokens"]]

        def status() -> dict[str, Any]:
            r = http.get(f"/domains/{name}/ses-status")
            assert r.status_code == 200, r.text
            return r.json()

        assert status() == {"name": name, "ses_verified": False, "verification_status": "Pending",
                            "dkim_status": "Pending"}
        with zone.lock:  # wrong values published: Failed
            zone.txt[token_name] = ["not-the-token"]
            for n in dkim_names:
                zone.txt[n] = ["v=DKIM1; k=rsa; p=AAAA"]
        got = status()
        assert (got["verification_status"], got["dkim_status"], got["ses_verified"]) == ("Failed", "Failed", False)
        with zone.lock:  # the token only: still not verified
            zone.txt[token_name] = [records[token_name]]
        got = status()
        assert (got["verification_status"], got["dkim_status"], got["ses_verified"]) == ("Success", "Failed", False)
        with zone.lock:  # two of the three DKIM keys: not yet
            for n in dkim_names[:2]:
                zone.txt[n] = [records[n]]
            zone.txt.pop(dkim_names[2])
        got = status()
        assert (got["verification_status"], got["dkim_status"], got["ses_verified"]) == ("Success", "Pending", False)
        with zone.lock:
            zone.txt[dkim_names[2]] = [records[dkim_names[2]]]
        assert status() == {"name": name, "ses_verified": True, "verification_status": "Success",
                            "dkim_status": "Success"}
        assert http.get(f"/domains/{name}/outbound").json()["ses_verified"] is True

        # DKIM rotation: a new selector is published next to the current one, switched to once it
        # verifies, and the old one is retired
        old_selector = body["ses_dkim_tokens"][0]
        rot = http.post(f"/domains/{name}/dkim/rotate")
        assert rot.status_code == 200, rot.text
        rot = rot.json()
        new_selector = rot["next_selector"]
        assert rot["selector"] == old_selector and new_selector not in (None, old_selector)
        assert rot["next_status"] == "Pending" and rot["retired_selectors"] == []
        new_record = next(r for r in rot["dns_records"] if r["name"] == f"{new_selector}._domainkey.{name}")
        assert http.post(f"/domains/{name}/dkim/rotate").json()["next_selector"] == new_selector  # idempotent
        assert status()["dkim_status"] == "Success"  # still signing with the old, published key
        assert http.get(f"/domains/{name}/dkim").json()["next_status"] == "Pending"
        with zone.lock:
            zone.txt[new_record["name"]] = [new_record["value"]]
        assert status() == {"name": name, "ses_verified": True, "verification_status": "Success",
                            "dkim_status": "Success"}
        dkim = http.get(f"/domains/{name}/dkim").json()
        assert (dkim["selector"], dkim["next_selector"], dkim["retired_selectors"]) == (
            new_selector, None, [old_selector])
        assert http.post(f"/domains/{name}/ses-verify").json()["ses_dkim_tokens"] == [
            new_selector, *body["ses_dkim_tokens"][1:]]
    # the record is shared: the main API sees the domain verified too
    wait_until(lambda: t.http.get(f"/domains/{name}/outbound").json()["ses_verified"], timeout=10,
               what="verified on the main API")


def test_counters_survive_a_sender_kill_without_double_counting(system: LocalSystem,
                                                                  new_tenant: Callable[..., Tenant]) -> None:
    """The ledger table is recovered from its changelog; commands re-read after the kill (their
    offsets were not committed yet) are recognised by the entry's last offset, not counted again."""
    t = new_tenant()
    name = domain()
    register(t, name)

    async def burst(n: int) -> None:
        async with httpx.AsyncClient(base_url=str(t.http.base_url), headers={"X-API-Token": t.api_key},
                                     timeout=60) as c:
            responses = await asyncio.gather(*(c.post(f"/domains/{name}/outbound/increment") for _ in range(n)))
        assert all(r.status_code == 200 for r in responses)

    asyncio.run(burst(20))
    system.kill_service("sender")  # right away: the last commands' offsets are not committed yet
    system.start_service("sender")
    # the first call after the restart may outlast the answer timeout while the worker recovers;
    # it is applied either way (once)
    r = t.http.post(f"/domains/{name}/outbound/increment")
    assert r.status_code in (200, 503), r.text
    if r.status_code == 200:
        assert r.json()["outbound_sent_today"] == 21

    seen: list[int] = []

    def count() -> int:
        seen.append(int(t.http.get(f"/domains/{name}/outbound").json()["outbound_sent_today"]))
        return seen[-1]

    try:
        wait_until(lambda: count() == 21, timeout=60, what="21 counted")
    except AssertionError:
        raise AssertionError(f"counts seen after the restart: {sorted(set(seen))}, first call {r.text}") from None
    assert inc(t.http, name)["outbound_sent_today"] == 22
