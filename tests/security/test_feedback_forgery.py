"""Forged bounce and complaint feedback (issue 8, findings 4 and 5): nobody but SES through the
operator's own SNS topic, and then only about a message Postbus sent and its recipients, can
suppress an address or count a bounce/complaint.

SES over SNS (POST /webhooks/ses, signed by the test SNS server of tests/support/sns_server.py, whose
topic the session system lists in POSTBUS_SNS_TOPIC_ARNS): an unlisted topic, a subscription of an
unlisted topic, a stale or future Timestamp, a replayed MessageId, a notification naming another
tenant (X-Postbus-Tenant or the From domain) and one listing a non-recipient of a real message.
The inbound SMTP listener: a DSN and an ARF report about a real message naming a non-recipient.
Each test first shows (or afterwards, in the same tenant's ordered log) that the legitimate
notification or report does suppress and count its recipient; every attack is refused with a stable
error, or acknowledged without recording anything, and suppresses and counts nobody."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.integration.test_bounces import _deliver
from tests.integration.test_bounces import _dsn as bounce_dsn
from tests.support.smtp_server import RecordingSmtpServer
from tests.support.sns_server import TOPIC, SnsTestServer

OTHER_TOPIC = "arn:aws:sns:eu-west-1:999999999999:ses"  # another AWS account's topic, same name


@pytest.fixture(scope="module")
def sns(system: LocalSystem) -> Iterator[SnsTestServer]:
    server = SnsTestServer(system.state_dir / "sns-test-ca.pem").start()  # the CA the API trusts
    yield server
    server.stop()


@pytest.fixture
def hook(system: LocalSystem) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url("api"), timeout=30) as c:  # SNS sends no token
        yield c


# -- helpers ---------------------------------------------------------------------------------------

def _post(hook: httpx.Client, msg: dict[str, Any]) -> httpx.Response:
    return hook.post("/webhooks/ses", content=json.dumps(msg),
                     headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": msg["Type"]})


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == code and body["error"]["message"], body


def _addr(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.test"


def _send(t: Tenant, smtp: RecordingSmtpServer, *messages: dict[str, Any]) -> dict[str, Any]:
    """Submit ``messages`` and return them as the SMTP server received them, by id."""
    r = t.http.post("/commands/add-messages", json={"messages": list(messages)})
    assert r.status_code == 200, r.text
    ids = {m["id"] for m in messages}

    def arrived() -> dict[str, Any] | None:
        got = {m.message["X-Postbus-Message-Id"]: m for m in smtp.messages if m.message["X-Postbus-Tenant"] == t.id}
        return got if ids <= got.keys() else None

    got = wait_until(arrived, timeout=60, what=f"{sorted(ids)} at the SMTP server")
    return {i: got[i] for i in ids}


def _ses(kind: str, recipients: list[str], *, source: str, tenant: str | None = None, mid: str | None = None,
         rfc_mid: str | None = None, permanent: bool = True) -> dict[str, Any]:
    """An SES Bounce/Complaint notification body; the Postbus headers only when given."""
    headers = [{"name": "From", "value": source}]
    if mid is not None:
        headers.append({"name": "X-Postbus-Message-Id", "value": mid})
    if tenant is not None:
        headers.append({"name": "X-Postbus-Tenant", "value": tenant})
    mail = {"source": source, "destination": recipients, "messageId": "ses-" + uuid.uuid4().hex,
            "headers": headers,
            "commonHeaders": {"from": [source], "messageId": rfc_mid or f"<{uuid.uuid4().hex}@{source.split('@')[1]}>"}}
    if kind == "bounce":
        bounced = [{"emailAddress": a, "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
                   for a in recipients]
        return {"notificationType": "Bounce", "mail": mail,
                "bounce": {"bounceType": "Permanent" if permanent else "Transient", "bounceSubType": "General",
                           "bouncedRecipients": bounced}}
    return {"notificationType": "Complaint", "mail": mail,
            "complaint": {"complainedRecipients": [{"emailAddress": a} for a in recipients],
                          "complaintFeedbackType": "abuse"}}


def _about(t: Tenant, sent: Any, kind: str, recipients: list[str]) -> dict[str, Any]:
    """A legitimate SES notification about a message the system sent (its own headers)."""
    m = sent.message
    return _ses(kind, recipients, source=m["From"], tenant=t.id, mid=m["X-Postbus-Message-Id"], rfc_mid=m["Message-ID"])


def _suppressed(t: Tenant) -> dict[str, dict[str, Any]]:
    r = t.http.get("/suppressions")
    assert r.status_code == 200, r.text
    return {s["address"]: s for s in r.json()["suppressions"]}


def _metrics(t: Tenant) -> dict[str, Any]:
    r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"},
                   headers={"Authorization": f"Bearer {t.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def _reports(t: Tenant, mid: str, field: str) -> list[dict[str, Any]]:
    return [r for r in t.client.reports_for(mid) if field in r]


def _wait_recorded(t: Tenant, address: str, field: str, expected: int, what: str) -> dict[str, Any]:
    """Wait until ``address`` is suppressed and the tenant's ``field`` metric reaches ``expected``
    (the positive control went through the whole pipeline); return the suppression list."""
    wait_until(lambda: address in _suppressed(t), timeout=60, what=f"{what}: {address} suppressed")
    wait_until(lambda: _metrics(t)[field] >= expected, timeout=60, what=f"{what}: {field} >= {expected}")
    return _suppressed(t)


def _outbound_domain(t: Tenant) -> str:
    """An outbound domain of the tenant (registered after its mail was sent from it)."""
    domain = f"{t.id}.example.test"
    r = t.http.put(f"/domains/{domain}/outbound", json={})
    assert r.status_code == 200, r.text
    return domain


def _domain_counts(t: Tenant, domain: str) -> dict[str, Any]:
    r = t.http.get(f"/domains/{domain}/outbound")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _sns_timestamp(delta: dt.timedelta) -> str:
    return (dt.datetime.now(dt.UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# -- SES over SNS ----------------------------------------------------------------------------------

def test_notification_from_an_unlisted_topic_is_refused(new_tenant, smtp, sns: SnsTestServer,
                                                        hook: httpx.Client) -> None:
    t = new_tenant()
    victim, real = _addr("victim"), _addr("real")
    sent = _send(t, smtp, t.message("u-attack", to=[victim]), t.message("u-ok", to=[real]))
    # a genuine SNS signature, but another account's topic: refused before anything is fetched
    for topic in (OTHER_TOPIC, TOPIC + "-other", ""):
        r = _post(hook, sns.sign(sns.notification(_about(t, sent["u-attack"], "bounce", [victim]), topic=topic)))
        _refused(r, 403, "sns_topic_not_allowed")
    # control: the listed topic, same tenant
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["u-ok"], "bounce", [real]))))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    got = _wait_recorded(t, real, "bounced", 1, "listed topic")
    assert got[real]["reason"] == "hard_bounce" and got[real]["source"] == "ses"
    assert victim not in got
    assert _metrics(t)["bounced"] == 1
    assert not _reports(t, "u-attack", "bounce_ts")


def test_subscription_of_an_unlisted_topic_is_never_confirmed(sns: SnsTestServer, hook: httpx.Client) -> None:
    attack = sns.sign(sns.subscription(topic=OTHER_TOPIC))
    _refused(_post(hook, attack), 403, "sns_topic_not_allowed")
    # control: the listed topic's subscription is confirmed by fetching its SubscribeURL
    control = sns.sign(sns.subscription())
    r = _post(hook, control)
    assert r.status_code == 200 and r.json()["confirmed"] is True, r.text
    assert any(control["Token"] in path for path in sns.confirmations)
    # the SNS server recorded every GET of /confirm: the unlisted topic's URL was never fetched
    assert not any(attack["Token"] in path for path in sns.confirmations)


def test_stale_or_future_timestamps_are_refused(new_tenant, smtp, sns: SnsTestServer, hook: httpx.Client) -> None:
    t = new_tenant()
    victim, real = _addr("victim"), _addr("real")
    sent = _send(t, smtp, t.message("s-attack", to=[victim]), t.message("s-ok", to=[real]))
    for delta in (dt.timedelta(hours=-2), dt.timedelta(days=-30), dt.timedelta(hours=1)):
        note = {**sns.notification(_about(t, sent["s-attack"], "bounce", [victim])), "Timestamp": _sns_timestamp(delta)}
        _refused(_post(hook, sns.sign(note)), 403, "sns_message_stale")
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["s-ok"], "bounce", [real]))))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    got = _wait_recorded(t, real, "bounced", 1, "fresh notification")
    assert victim not in got and _metrics(t)["bounced"] == 1
    assert not _reports(t, "s-attack", "bounce_ts")


def test_replayed_message_id_is_refused(new_tenant, smtp, sns: SnsTestServer, hook: httpx.Client) -> None:
    t = new_tenant()
    first, second = _addr("first"), _addr("second")
    domain = f"{t.id}.example.test"
    sent = _send(t, smtp, t.message("r-1", to=[first], **{"from": f"app@{domain}"}),
                 t.message("r-2", to=[second], **{"from": f"app@{domain}"}))
    _outbound_domain(t)
    note = sns.sign(sns.notification(_about(t, sent["r-1"], "bounce", [first])))
    r = _post(hook, note)
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    # the very same signed message again (captured on the wire): refused, twice
    for _ in range(2):
        _refused(_post(hook, note), 409, "sns_message_replayed")
    # control after the replays, same tenant: its bounce is counted once more, the replays never
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["r-2"], "bounce", [second]))))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    _wait_recorded(t, second, "bounced", 2, "second notification")
    counts = wait_until(lambda: (c := _domain_counts(t, domain))["bounce_count"] >= 2 and c, timeout=60,
                        what="domain bounce count after the control")
    assert counts["bounce_count"] == 2  # r-1 once (not three times) + r-2
    wait_until(lambda: _reports(t, "r-2", "bounce_ts"), timeout=60, what="control bounce report")
    assert len(_reports(t, "r-1", "bounce_ts")) == 1


def test_notification_naming_another_tenant_is_not_attributed(new_tenant, smtp, sns: SnsTestServer,
                                                              hook: httpx.Client) -> None:
    a, b = new_tenant(), new_tenant()
    b_domain = f"{b.id}.example.test"
    a_rcpt, b_rcpt = _addr("a-rcpt"), _addr("b-rcpt")
    victim_h, victim_d = _addr("victim-header"), _addr("victim-domain")
    a_sent = _send(a, smtp, a.message("x-a", to=[a_rcpt]))
    b_sent = _send(b, smtp, b.message("x-b", to=[b_rcpt], **{"from": f"app@{b_domain}"}))
    _outbound_domain(b)
    a_msg = a_sent["x-a"].message
    attacks = [
        # B named by X-Postbus-Tenant, with A's real message id and Message-ID
        _ses("bounce", [a_rcpt], source=a_msg["From"], tenant=b.id, mid="x-a", rfc_mid=a_msg["Message-ID"]),
        # B named by X-Postbus-Tenant, a message id B never sent
        _ses("bounce", [victim_h], source=f"app@{b_domain}", tenant=b.id, mid="never-sent"),
        # no Postbus headers at all: only B's From domain
        _ses("complaint", [victim_d], source=f"app@{b_domain}"),
    ]
    for ses in attacks:
        r = _post(hook, sns.sign(sns.notification(ses)))
        assert r.status_code == 200, r.text
        assert r.json()["events"] == 0 and r.json()["ignored"].startswith("uncorrelated"), r.text
    # control: B's own message
    r = _post(hook, sns.sign(sns.notification(_about(b, b_sent["x-b"], "bounce", [b_rcpt]))))
    assert r.status_code == 200 and r.json()["events"] == 1, r.text
    got = _wait_recorded(b, b_rcpt, "bounced", 1, "B's own message")
    assert not {a_rcpt, victim_h, victim_d} & got.keys()
    data = _metrics(b)
    assert data["bounced"] == 1 and data["complaints"] == 0
    counts = wait_until(lambda: (c := _domain_counts(b, b_domain))["bounce_count"] >= 1 and c, timeout=60,
                        what="B's domain bounce count")
    assert counts["bounce_count"] == 1 and counts["complaint_count"] == 0
    assert not _reports(b, "x-a", "bounce_ts") and not _reports(b, "never-sent", "bounce_ts")


def test_notification_listing_a_non_recipient_is_not_recorded(new_tenant, smtp, sns: SnsTestServer,
                                                              hook: httpx.Client) -> None:
    t = new_tenant()
    rcpt, cc, other = _addr("rcpt"), _addr("cc"), _addr("other")
    outsider, outsider2 = _addr("outsider"), _addr("outsider2")
    sent = _send(t, smtp, t.message("n-1", to=[rcpt]), t.message("n-2", to=[other], cc=[cc]))
    # about a real message, but naming addresses it was not sent to
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["n-1"], "bounce", [outsider]))))
    assert r.status_code == 200, r.text
    assert r.json()["events"] == 0 and r.json()["refused"] == 1 and r.json()["ignored"], r.text
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["n-1"], "complaint", [outsider2]))))
    assert r.status_code == 200 and r.json()["events"] == 0 and r.json()["refused"] == 1, r.text
    # control: a real recipient (a Cc of n-2) is recorded; the outsider listed with it is not
    r = _post(hook, sns.sign(sns.notification(_about(t, sent["n-2"], "bounce", [cc, outsider]))))
    assert r.status_code == 200 and r.json()["events"] == 1 and r.json()["refused"] == 1, r.text
    got = _wait_recorded(t, cc, "bounced", 1, "recipient of the message")
    assert not {outsider, outsider2, rcpt} & got.keys()
    data = _metrics(t)
    assert data["bounced"] == 1 and data["complaints"] == 0
    assert not _reports(t, "n-1", "bounce_ts") and not _reports(t, "n-1", "complaint_ts")


# -- the inbound SMTP listener ---------------------------------------------------------------------

def _headers_of(sent: Any) -> str:
    head = sent.data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return head.replace("\n", "\r\n") + "\r\n"


def _dsn(headers: str, rcpt: str) -> str:
    return bounce_dsn(headers, rcpt, "5.1.1", f"550 5.1.1 <{rcpt}>: user unknown")


def _arf(headers: str, rcpt: str) -> str:
    b = "arf-" + uuid.uuid4().hex[:8]
    return (
        "From: fbl@isp.example.test\r\nTo: bounce@bounces.postbus.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{b}"\r\n\r\n'
        f"--{b}\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        f"--{b}\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nVersion: 1\r\n"
        f"User-Agent: FBL/1.0\r\nOriginal-Rcpt-To: <{rcpt}>\r\n\r\n"
        f"--{b}\r\nContent-Type: message/rfc822\r\n\r\n{headers}\r\nbody\r\n--{b}--\r\n"
    )


def _inbound_refused(system: LocalSystem, kind: str) -> float:
    """postbus_inbound_feedback_refused_total{kind, reason="not_a_recipient"} of the inbound process."""
    token_file = system.state_dir / "internal.token"
    headers = {"X-Internal-Token": token_file.read_text().strip()} if token_file.exists() else {}
    r = httpx.get(f"http://127.0.0.1:{system.ports['inbound']}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text[:200]
    pattern = (rf'^postbus_inbound_feedback_refused_total\{{(?=[^}}]*kind="{kind}")'
               rf'(?=[^}}]*reason="not_a_recipient")[^}}]*\}} ([0-9.e+]+)$')
    m = re.search(pattern, r.text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("kind", ["bounce", "complaint"])
def test_forged_inbound_report_naming_a_non_recipient_is_not_counted(kind: str, system: LocalSystem, new_tenant,
                                                                     smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    rcpt1, rcpt2, outsider = _addr("rcpt1"), _addr("rcpt2"), _addr("outsider")
    sent = _send(t, smtp, t.message("i-1", to=[rcpt1]), t.message("i-2", to=[rcpt2]))
    report = _dsn if kind == "bounce" else _arf
    before = _inbound_refused(system, kind)
    # the real headers of i-1 (a forger who saw the message), naming someone it was not sent to
    _deliver(system, report(_headers_of(sent["i-1"]), outsider))
    assert _inbound_refused(system, kind) == before + 1  # handled before the listener's 250
    # control: the same kind of report about i-2, naming its recipient
    _deliver(system, report(_headers_of(sent["i-2"]), rcpt2))
    field, ts_field = ("bounced", "bounce_ts") if kind == "bounce" else ("complaints", "complaint_ts")
    got = _wait_recorded(t, rcpt2, field, 1, f"{kind} about i-2")
    assert got[rcpt2]["reason"] == ("hard_bounce" if kind == "bounce" else "complaint")
    assert outsider not in got and rcpt1 not in got
    assert _metrics(t)[field] == 1
    wait_until(lambda: _reports(t, "i-2", ts_field), timeout=60, what=f"{kind} report of i-2")
    assert not _reports(t, "i-1", ts_field)
    assert _inbound_refused(system, kind) == before + 1


# -- no topic configured ---------------------------------------------------------------------------

def test_without_a_configured_topic_every_sns_message_is_refused(secure_system: LocalSystem, sns: SnsTestServer,
                                                                 hook: httpx.Client) -> None:
    """The production-policy system sets no POSTBUS_SNS_TOPIC_ARNS: nothing is accepted, nothing is
    fetched, and its log says why. Control: the same signed message is confirmed by the session system,
    whose operator listed the topic."""
    sub = sns.sign(sns.subscription())
    with httpx.Client(base_url=secure_system.url("api"), timeout=30) as secure_hook:
        _refused(_post(secure_hook, sub), 403, "sns_topic_not_allowed")
        assert not any(sub["Token"] in path for path in sns.confirmations)
        note = sns.sign(sns.notification(_ses("bounce", [_addr("x")], source="app@nowhere.test", tenant="t", mid="m")))
        _refused(_post(secure_hook, note), 403, "sns_topic_not_allowed")
    log = secure_system.log_path("api")
    wait_until(lambda: "POSTBUS_SNS_TOPIC_ARNS is unset" in log.read_text(errors="replace"), timeout=10,
               what="the API's log line about the unset topic list")
    r = _post(hook, sub)
    assert r.status_code == 200 and r.json()["confirmed"] is True, r.text
    assert any(sub["Token"] in path for path in sns.confirmations)
