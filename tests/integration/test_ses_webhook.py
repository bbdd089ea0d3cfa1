"""POST /webhooks/ses with SNS messages signed by a test CA's certificate served over HTTPS, from the
topic the session system lists (POSTBUS_SNS_TOPIC_ARNS, tests/conftest.py): subscription
confirmation, a hard bounce (event, suppression, domain bounce count), a complaint, and refusals
(forged signature, certificate URL on a non-SNS host or over http). Feedback is about messages the
system really sent; the attacks (unlisted topics, stale or replayed messages, other tenants,
non-recipients) are in tests/security/test_feedback_forgery.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import wait_until
from tests.support.sns_server import SnsTestServer, ses_bounce, ses_complaint


@pytest.fixture(scope="module")
def sns(system) -> Iterator[SnsTestServer]:
    # the API reads its CA bundle (POSTBUS_SNS_CA_FILE, set by conftest) on each certificate fetch
    server = SnsTestServer(system.state_dir / "sns-test-ca.pem").start()
    yield server
    server.stop()


@pytest.fixture
def hook(system) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url("api"), timeout=30) as c:  # SNS sends no token
        yield c


def _post(hook: httpx.Client, msg: dict) -> httpx.Response:
    import json

    return hook.post("/webhooks/ses", content=json.dumps(msg), headers={"Content-Type": "text/plain; charset=UTF-8",
                                                                         "x-amz-sns-message-type": msg["Type"]})


def test_subscription_is_confirmed(sns: SnsTestServer, hook: httpx.Client) -> None:
    before = len(sns.confirmations)
    r = _post(hook, sns.sign(sns.subscription(), version=1))
    assert r.status_code == 200 and r.json()["confirmed"] is True, r.text
    assert len(sns.confirmations) == before + 1


def test_forged_and_wrong_host_are_refused(sns: SnsTestServer, hook: httpx.Client) -> None:
    note = sns.notification(ses_bounce("t-x", "m-x", "x@example.test", "a@x.test"))
    forged = {**sns.sign(note), "Message": note["Message"].replace("x@example.test", "victim@example.test")}
    for msg in (forged,
                sns.sign(note, cert_url="https://evil.example.com/SimpleNotificationService-test.pem"),
                sns.sign(note, cert_url=sns.cert_url.replace("https://", "http://")),
                {**sns.sign(note), "Signature": "bm90IGEgc2lnbmF0dXJl"}):
        r = _post(hook, msg)
        assert r.status_code == 403, r.text
        assert r.json()["ok"] is False and r.json()["error"]["code"] == "invalid_signature"
    assert hook.post("/webhooks/ses", content=b"not json").status_code == 400


def test_hard_bounce_and_complaint_are_recorded(new_tenant, smtp, sns: SnsTestServer, hook: httpx.Client) -> None:
    t = new_tenant()
    domain = f"{t.id}.example.test"
    bounced, complainer = f"gone-{uuid.uuid4().hex[:6]}@example.test", f"angry-{uuid.uuid4().hex[:6]}@example.test"
    # real messages first (feedback is attributed only to a message Postbus sent, and its recipients)
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("ses-1", to=[bounced], **{"from": f"app@{domain}"}),
        t.message("ses-2", to=[complainer], **{"from": f"app@{domain}"}),
        t.message("ses-3", to=["soft@example.test"], **{"from": f"app@{domain}"})]})
    assert r.status_code == 200, r.text
    wait_until(lambda: {m.message["X-Postbus-Message-Id"] for m in smtp.messages
                        if m.message["X-Postbus-Tenant"] == t.id} >= {"ses-1", "ses-2", "ses-3"},
               timeout=60, what="the messages at the SMTP server")
    r = t.http.put(f"/domains/{domain}/outbound", json={})
    assert r.status_code == 200, r.text
    r = _post(hook, sns.sign(sns.notification(ses_bounce(t.id, "ses-1", bounced, f"app@{domain}"))))
    assert r.status_code == 200 and r.json()["notification"] == "Bounce" and r.json()["events"] == 1, r.text
    r = _post(hook, sns.sign(sns.notification(ses_complaint(t.id, "ses-2", complainer, f"app@{domain}")), version=1))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    # a transient bounce is an event but suppresses nothing
    r = _post(hook, sns.sign(sns.notification(ses_bounce(t.id, "ses-3", "soft@example.test", f"app@{domain}",
                                                         permanent=False))))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    # uncorrelated (unknown tenant): acknowledged, nothing recorded
    r = _post(hook, sns.sign(sns.notification(ses_bounce("no-such-tenant", "m", "z@example.test", "a@nowhere.test"))))
    assert r.status_code == 200 and r.json()["ignored"] and r.json()["events"] == 0, r.text

    def suppressed() -> dict:
        return {s["address"]: s for s in t.http.get("/suppressions").json()["suppressions"]}

    got = wait_until(lambda: len(s := suppressed()) >= 2 and s, timeout=60, what="auto-suppression")
    assert got[bounced]["reason"] == "hard_bounce" and got[bounced]["source"] == "ses"
    assert got[complainer]["reason"] == "complaint"
    assert "soft@example.test" not in got

    def outbound() -> dict:
        return t.http.get(f"/domains/{domain}/outbound").json()

    out = wait_until(lambda: (o := outbound())["bounce_count"] >= 1 and o["complaint_count"] >= 1 and o,
                     timeout=60, what="domain feedback counted")
    assert out["bounce_count"] == 1 and out["complaint_count"] == 1

    def metrics() -> dict:
        return t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"}).json()["data"]

    wait_until(lambda: (d := metrics())["bounced"] >= 1 and d["complaints"] >= 1, timeout=60, what="metrics")
