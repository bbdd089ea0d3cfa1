"""The outbound domain document (seed: outbound-email-domain-api), as a client written against it
uses it: over HTTP only, reading right after writing, no sleeps. Native ses-verify answers a
verification TXT record and three DKIM selectors and ses-status checks all of them in DNS; mail From
a registered domain is blocked until it is verified; increment is idempotent under client retry
(Idempotency-Key, also after a 503 that came after the ledger applied the increment); an increment
for a message Postbus sent itself (its X-Postbus-Message-Id) is not counted twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.integration.test_domains import _Zone, dns_api, extra_api, register  # noqa: F401  (module fixture)
from tests.support.smtp_server import RecordingSmtpServer

pytestmark = pytest.mark.integration
VERIFY_FIELDS = {"name", "ses_verification_token", "ses_dkim_tokens", "ses_verified", "dns_records"}


def domain() -> str:
    return f"c{uuid.uuid4().hex[:10]}.example.test"


def outbound(http: httpx.Client, name: str) -> dict[str, Any]:
    r = http.get(f"/domains/{name}/outbound")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def increment(http: httpx.Client, name: str, **kw: Any) -> httpx.Response:
    return http.post(f"/domains/{name}/outbound/increment", **kw)


def mail_of(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> Any:
    got = [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == tenant_id
           and m.message["X-Postbus-Message-Id"] == mid]
    return got[0] if got else None


def publish(zone: _Zone, records: list[dict[str, str]]) -> None:
    with zone.lock:
        for rec in records:
            assert rec["type"] == "TXT", rec  # the native backend publishes TXT records only
            zone.txt[rec["name"]] = [rec["value"]]


@pytest.fixture
def dns_client(dns_api: tuple[str, _Zone]) -> Iterator[Callable[[Tenant], httpx.Client]]:  # noqa: F811
    """A client of the API process that resolves through the test's DNS server, for a tenant."""
    url, _ = dns_api
    made: list[httpx.Client] = []

    def make(t: Tenant) -> httpx.Client:
        http = httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30)
        made.append(http)
        # the tenant was created through the main API: this process reads its key from the log
        wait_until(lambda: http.get(f"/domains/{domain()}/outbound").status_code == 404, timeout=60,
                   what="tenant key visible")
        return http

    yield make
    for http in made:
        http.close()


def test_write_then_read_at_once(new_tenant: Callable[..., Tenant], admin: httpx.Client) -> None:
    t = new_tenant()
    name = domain()
    assert t.http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    assert outbound(t.http, name)["outbound_sent_today"] == 0
    r = admin.put(f"/domains/{name}/outbound", json={"outbound_daily_limit": 500, "outbound_monthly_limit": 10000})
    assert r.status_code == 200, r.text
    got = outbound(t.http, name)
    assert (got["outbound_daily_limit"], got["outbound_monthly_limit"]) == (500, 10000)
    for n in (1, 2, 3):
        r = increment(t.http, name)
        assert r.status_code == 200, r.text
        assert r.json() == {"name": name, "outbound_sent_today": n, "outbound_sent_month": n, "allowed": True,
                            "reason": None}
        got = outbound(t.http, name)
        assert (got["outbound_sent_today"], got["outbound_sent_month"]) == (n, n)


def test_increment_retried_with_the_same_key_counts_once(new_tenant: Callable[..., Tenant]) -> None:
    t = new_tenant()
    name = domain()
    register(t, name)
    first = increment(t.http, name, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 200, first.text
    assert first.json()["outbound_sent_today"] == 1 and "Idempotent-Replayed" not in first.headers
    retry = increment(t.http, name, headers={"Idempotency-Key": "order-1"})
    assert retry.status_code == 200, retry.text
    assert retry.json() == first.json() and retry.headers["Idempotent-Replayed"] == "true"
    assert outbound(t.http, name)["outbound_sent_today"] == 1
    # positive control: another key (and no key) counts again
    other = increment(t.http, name, headers={"Idempotency-Key": "order-2"})
    assert other.status_code == 200 and other.json()["outbound_sent_today"] == 2, other.text
    assert increment(t.http, name).json()["outbound_sent_today"] == 3
    assert increment(t.http, name).json()["outbound_sent_today"] == 4
    # the body field is the same key as the header
    r = increment(t.http, name, json={"idempotency_key": "order-2"})
    assert r.status_code == 200 and r.json() == other.json() and r.headers["Idempotent-Replayed"] == "true"
    # refused keys count nothing
    r = increment(t.http, name, headers={"Idempotency-Key": "a"}, json={"idempotency_key": "b"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_conflict", r.text
    r = increment(t.http, name, headers={"Idempotency-Key": "x" * 256})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_idempotency_key", r.text
    got = outbound(t.http, name)
    assert (got["outbound_sent_today"], got["outbound_sent_month"]) == (4, 4)
    # keys are the tenant's own: another tenant's same key on its domain counts
    u = new_tenant()
    name_u = domain()
    register(u, name_u)
    r = increment(u.http, name_u, headers={"Idempotency-Key": "order-1"})
    assert r.status_code == 200 and r.json()["outbound_sent_today"] == 1 and "Idempotent-Replayed" not in r.headers


def test_a_retry_after_a_503_counts_once(system: LocalSystem, new_tenant: Callable[..., Tenant]) -> None:
    """An API process whose ledger answer timeout is 0 answers every increment 503 ledger_unavailable
    after appending it: the ledger applies it anyway. The client retries on the normal API."""
    t = new_tenant()
    name = domain()
    register(t, name)
    with extra_api(system, "api-no-wait", POSTBUS_DOMAIN_RESULT_TIMEOUT_S="0") as url, \
            httpx.Client(base_url=url, headers={"X-API-Token": t.api_key}, timeout=30) as impatient:
        wait_until(lambda: impatient.get(f"/domains/{name}/outbound").status_code == 200, timeout=60,
                   what="domain visible")
        r = increment(impatient, name, headers={"Idempotency-Key": "mail-1"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
        retry = increment(t.http, name, headers={"Idempotency-Key": "mail-1"})
        assert retry.status_code == 200, retry.text
        # the 503'd call was applied (count 1) and its answer is the retry's; nothing counted twice
        assert retry.json() == {"name": name, "outbound_sent_today": 1, "outbound_sent_month": 1, "allowed": True,
                                "reason": None}
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert outbound(t.http, name)["outbound_sent_today"] == 1
        # positive control: without a key the same 503-then-retry counts twice
        r = increment(impatient, name)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
        r = increment(t.http, name)
        assert r.status_code == 200 and r.json()["outbound_sent_today"] == 3, r.text


def test_native_ses_verify_shape_and_status_checks_what_it_asked_for(
        new_tenant: Callable[..., Tenant], dns_api: tuple[str, _Zone],  # noqa: F811
        dns_client: Callable[[Tenant], httpx.Client]) -> None:
    _, zone = dns_api
    t = new_tenant()
    http = dns_client(t)
    name = domain()
    r = http.post(f"/domains/{name}/ses-verify")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == VERIFY_FIELDS and body["name"] == name and body["ses_verified"] is False
    tokens = body["ses_dkim_tokens"]
    assert isinstance(tokens, list) and len(tokens) == 3 and len(set(tokens)) == 3
    assert body["dns_records"][0] == {"type": "TXT", "name": f"_amazonses.{name}",
                                      "value": body["ses_verification_token"]}
    # one record per token, under <token>._domainkey.<domain>, as TXT: the key itself
    dkim = body["dns_records"][1:]
    assert [rec["name"] for rec in dkim] == [f"{tok}._domainkey.{name}" for tok in tokens]
    assert all(rec["type"] == "TXT" and rec["value"].startswith("v=DKIM1; k=rsa; p=") for rec in dkim)
    assert len({rec["value"] for rec in dkim}) == 3
    assert http.post(f"/domains/{name}/ses-verify").json() == body  # the same records until rotated

    def status() -> dict[str, Any]:
        r = http.get(f"/domains/{name}/ses-status")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    # everything but the third DKIM key published: not verified, the mail stays blocked
    publish(zone, body["dns_records"][:3])
    assert status() == {"name": name, "ses_verified": False, "verification_status": "Success",
                        "dkim_status": "Pending"}
    assert outbound(http, name)["ses_verified"] is False
    with zone.lock:
        zone.txt[dkim[2]["name"]] = ["v=DKIM1; k=rsa; p=MIIBIjANBgkq"]  # a wrong key there: Failed
    assert status()["dkim_status"] == "Failed"
    publish(zone, body["dns_records"])  # all of it: verified, readable at once
    assert status() == {"name": name, "ses_verified": True, "verification_status": "Success",
                        "dkim_status": "Success"}
    assert outbound(http, name)["ses_verified"] is True
    dkim_info = http.get(f"/domains/{name}/dkim").json()
    assert dkim_info["selector"] == tokens[0] and dkim_info["standby_selectors"] == tokens[1:]


def test_mail_from_a_registered_domain_is_blocked_until_verified(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone],  # noqa: F811
        dns_client: Callable[[Tenant], httpx.Client]) -> None:
    _, zone = dns_api
    t = new_tenant()
    http = dns_client(t)
    name = domain()
    assert http.put(f"/domains/{name}/outbound", json={}).status_code == 200
    blocked = t.message("blocked-1", **{"from": f"News <news@{name}>"})
    control = t.message("control-1")  # From a domain nobody registered: not limited
    r = http.post("/commands/add-messages", json={"messages": [blocked, control]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    (rejected,) = r.json()["rejected"]
    assert rejected["id"] == "blocked-1" and rejected["reason"].startswith("sender_domain_not_verified"), rejected
    wait_until(lambda: mail_of(smtp, t.id, "control-1"), timeout=60, what="the control message delivered")
    assert mail_of(smtp, t.id, "blocked-1") is None
    assert outbound(http, name)["outbound_sent_today"] == 0
    # verified: the same message, queued at once, goes out
    body = http.post(f"/domains/{name}/ses-verify").json()
    publish(zone, body["dns_records"])
    assert http.get(f"/domains/{name}/ses-status").json()["ses_verified"] is True
    r = http.post("/commands/add-messages", json={"messages": [blocked]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    mail = wait_until(lambda: mail_of(smtp, t.id, "blocked-1"), timeout=60, what="delivered once verified")
    assert f"s={body['ses_dkim_tokens'][0]};" in "".join(mail.message["DKIM-Signature"].split())


def test_increment_for_mail_postbus_sent_is_not_counted_twice(
        new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer, dns_api: tuple[str, _Zone],  # noqa: F811
        dns_client: Callable[[Tenant], httpx.Client]) -> None:
    """The Policy Daemon of the MTA Postbus relays through calls increment for every message it sees,
    naming it by the X-Postbus-Message-Id header Postbus wrote: the message is counted once."""
    _, zone = dns_api
    t = new_tenant()
    http = dns_client(t)
    name, sentinel = domain(), domain()
    for n in (name, sentinel):
        publish(zone, http.post(f"/domains/{n}/ses-verify").json()["dns_records"])
        assert http.get(f"/domains/{n}/ses-status").json()["ses_verified"] is True

    def queue(mid: str, from_domain: str) -> None:
        msg = t.message(mid, **{"from": f"app@{from_domain}"})
        r = http.post("/commands/add-messages", json={"messages": [msg]})
        assert r.status_code == 200 and r.json()["queued"] == 1, r.text

    def sent_today(n: str = name) -> int:
        return int(outbound(http, n)["outbound_sent_today"])

    # Postbus sends and counts first; then the client's increment names the message
    queue("m1", name)
    mail = wait_until(lambda: mail_of(smtp, t.id, "m1"), timeout=60, what="m1 delivered")
    wait_until(lambda: sent_today() == 1, timeout=60, what="m1 counted by its send")
    header = mail.message["X-Postbus-Message-Id"]
    r = increment(http, name, headers={"X-Postbus-Message-Id": header})
    assert r.status_code == 200, r.text
    assert (r.json()["outbound_sent_today"], r.json()["allowed"]) == (1, True)
    assert r.headers["Idempotent-Replayed"] == "true" and sent_today() == 1
    # positive control: a message Postbus did not send is counted
    r = increment(http, name, headers={"X-Postbus-Message-Id": "not-sent-by-postbus"})
    assert r.status_code == 200 and r.json()["outbound_sent_today"] == 2 and sent_today() == 2, r.text

    # the client's increment first (the MTA's policy check runs before Postbus hears the 250), then the send
    r = increment(http, name, json={"message_id": "m2"})
    assert r.status_code == 200 and r.json()["outbound_sent_today"] == 3, r.text
    queue("m2", name)
    wait_until(lambda: mail_of(smtp, t.id, "m2"), timeout=60, what="m2 delivered")
    # m2's sent event is in the log once the listing shows it sent; a message of the tenant's other
    # domain sent after that comes later in the same partition: once the ledger counted it, it had
    # applied m2's send
    wait_until(lambda: any(m.get("id") == "m2" and m.get("sent_ts") for m in http.get("/messages").json()["messages"]),
               timeout=60, what="m2 sent")
    queue("s1", sentinel)
    wait_until(lambda: sent_today(sentinel) == 1, timeout=60, what="the sentinel counted")
    assert sent_today() == 3, "m2 was counted by its increment and again by its send"
