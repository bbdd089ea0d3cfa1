"""Bounces, complaints and PEC receipts end to end on real servers: a message goes out through the
system to the recording SMTP server, then a DSN / ARF report / PEC receipt for it is delivered over
SMTP to the inbound listener; the client app gets the report and the tenant's metrics count it."""

from __future__ import annotations

import smtplib
import uuid

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer


def _sent_headers(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> str:
    def find() -> bytes | None:
        for m in smtp.messages:
            if m.message["X-Postbus-Tenant"] == tenant_id and m.message["X-Postbus-Message-Id"] == mid:
                return m.data
        return None

    data = wait_until(find, timeout=60, what=f"{mid} at the SMTP server")
    return data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode().replace("\n", "\r\n") + "\r\n"


def _deliver(system: LocalSystem, raw: str) -> None:
    with smtplib.SMTP("127.0.0.1", system.inbound_smtp_port, timeout=30) as s:
        s.sendmail("", ["bounce@bounces.postbus.test"], raw.encode())


def _dsn(headers: str, rcpt: str, status: str, diag: str, action: str = "failed") -> str:
    b = "dsn-" + uuid.uuid4().hex[:8]
    return (
        "From: MAILER-DAEMON@mx.example.test\r\nTo: bounce@bounces.postbus.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\r\n\r\n'
        f"--{b}\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n"
        f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\n{headers}\r\n--{b}--\r\n"
    )


def _metrics(t: Tenant) -> dict:
    r = t.http.get(f"/api/v1/tenants/{t.id}/smtp/metrics", params={"window": "24h"},
                   headers={"Authorization": f"Bearer {t.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _report(t: Tenant, mid: str, field: str) -> dict | None:
    return next((r for r in t.client.reports_for(mid) if field in r), None)


def test_dsn_bounces_are_reported_and_hard_ones_counted(system: LocalSystem, new_tenant,
                                                         smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("hard-1", to=["gone@example.test"]), t.message("soft-1", to=["full@example.test"])]})
    assert r.status_code == 200, r.text
    hard_headers = _sent_headers(smtp, t.id, "hard-1")
    soft_headers = _sent_headers(smtp, t.id, "soft-1")
    wait_until(lambda: _report(t, "hard-1", "sent_ts") and _report(t, "soft-1", "sent_ts"), timeout=60,
               what="sent reports")

    _deliver(system, _dsn(hard_headers, "gone@example.test", "5.1.1",
                          "550 5.1.1 <gone@example.test>: Recipient address rejected: User unknown"))
    _deliver(system, _dsn(soft_headers, "full@example.test", "4.2.2", "452 4.2.2 Mailbox full", action="delayed"))

    hard = wait_until(lambda: _report(t, "hard-1", "bounce_ts"), timeout=60, what="hard bounce report")
    assert hard["bounce_type"] == "hard" and hard["bounce_code"] == "5.1.1"
    assert "User unknown" in hard["bounce_reason"]
    assert hard["tenant_id"] == t.id and hard["pk"] and hard["recipient_email"] == "gone@example.test"
    soft = wait_until(lambda: _report(t, "soft-1", "bounce_ts"), timeout=60, what="soft bounce report")
    assert soft["bounce_type"] == "soft" and soft["bounce_code"] == "4.2.2"

    # only the hard bounce counts as bounced
    data = wait_until(lambda: (d := _metrics(t))["bounced"] == 1 and d, timeout=60, what="bounced == 1")
    assert data["sent"] == 2

    # the same DSN delivered again (an MTA retry) changes no count
    _deliver(system, _dsn(hard_headers, "gone@example.test", "5.1.1",
                          "550 5.1.1 <gone@example.test>: Recipient address rejected: User unknown"))
    assert _metrics(t)["bounced"] == 1


def test_arf_complaint_is_reported_and_counted(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("c-1")]}).status_code == 200
    headers = _sent_headers(smtp, t.id, "c-1")
    b = "arf-" + uuid.uuid4().hex[:8]
    _deliver(system, (
        "From: fbl@isp.example.test\r\nTo: bounce@bounces.postbus.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{b}"\r\n\r\n'
        f"--{b}\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        f"--{b}\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nVersion: 1\r\n"
        "User-Agent: FBL/1.0\r\nOriginal-Rcpt-To: <bob@example.test>\r\n\r\n"
        f"--{b}\r\nContent-Type: message/rfc822\r\n\r\n{headers}\r\nbody\r\n--{b}--\r\n"))
    rep = wait_until(lambda: _report(t, "c-1", "complaint_ts"), timeout=60, what="complaint report")
    assert rep["feedback_type"] == "abuse" and rep["recipient_email"] == "bob@example.test"
    wait_until(lambda: _metrics(t)["complaints"] == 1, timeout=60, what="complaints == 1")


def test_pec_receipt_correlates_by_message_id(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("p-1")]}).status_code == 200
    headers = _sent_headers(smtp, t.id, "p-1")
    mid = next(line.split(":", 1)[1].strip() for line in headers.split("\r\n")
               if line.lower().startswith("message-id:"))
    for kind in ("accettazione", "avvenuta-consegna"):
        _deliver(system, (
            f"From: posta-certificata@pec.example.test\r\nTo: app@{t.id}.test\r\nSubject: {kind.upper()}: x\r\n"
            f"X-Ricevuta: {kind}\r\nX-Riferimento-Message-ID: {mid}\r\nX-Trasporto: posta-certificata\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@pec.example.test>\r\n\r\nricevuta\r\n"))
    wait_until(lambda: {r.get("pec_event") for r in t.client.reports_for("p-1")} >= {"pec_acceptance", "pec_delivery"},
               timeout=60, what="pec reports")
    rep = _report(t, "p-1", "pec_ts")
    assert rep is not None and rep["pec_ts"] > 0 and rep["tenant_id"] == t.id


def test_reports_about_unknown_messages_emit_nothing(system: LocalSystem, new_tenant,
                                                     smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    forged = (f"Message-ID: <nope@x.test>\r\nX-Postbus-Message-Id: never-sent\r\nX-Postbus-Tenant: {t.id}\r\n")
    _deliver(system, _dsn(forged, "x@example.test", "5.1.1", "550 5.1.1 unknown"))
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("after")]}).status_code == 200
    wait_until(lambda: _report(t, "after", "sent_ts"), timeout=60, what="a later report")
    assert not t.client.reports_for("never-sent")


def test_imap_poller_reads_dsns_from_a_real_dovecot_mailbox(system: LocalSystem, admin, new_tenant,
                                                            smtp: RecordingSmtpServer) -> None:
    from tests.support.imap_server import DovecotServer

    assert DovecotServer.available(), "dovecot is not installed (apt-get install dovecot-imapd)"
    t: Tenant = new_tenant()
    assert t.http.post("/commands/add-messages", json={"messages": [
        t.message("i-1", to=["a@example.test"]), t.message("i-2", to=["b@example.test"])]}).status_code == 200
    h1, h2 = _sent_headers(smtp, t.id, "i-1"), _sent_headers(smtp, t.id, "i-2")
    wait_until(lambda: _report(t, "i-2", "sent_ts"), timeout=60, what="sent report")
    # STARTTLS with a test certificate the sender trusts (POSTBUS_INBOUND_IMAP_CA_FILE of the session)
    with DovecotServer(tls=True) as imap:
        (system.state_dir / "imap-test-ca.pem").write_bytes(imap.cert_path.read_bytes())
        imap.append(_dsn(h1, "a@example.test", "5.1.1", "550 5.1.1 user unknown").encode())
        r = admin.put("/instance", json={"bounce": {
            "enabled": True, "imap_host": imap.host, "imap_port": imap.port, "imap_user": imap.user,
            "imap_password": imap.password, "mailbox": "INBOX", "poll_interval_seconds": 1}})
        assert r.status_code == 200, r.text
        assert imap.password not in r.text and r.json()["instance"]["bounce"]["has_imap_password"] is True
        try:
            rep = wait_until(lambda: _report(t, "i-1", "bounce_ts"), timeout=60, what="bounce from IMAP")
            assert rep["bounce_type"] == "hard" and rep["bounce_code"] == "5.1.1"
            # the poller logged in over TLS (the server's own readiness check logs in without)
            assert any("Login: user=" in line and ", TLS" in line for line in imap.log_text().splitlines())
            # a later message in the same mailbox: read once, the first one is not read again
            imap.append(_dsn(h2, "b@example.test", "5.1.2", "550 5.1.2 no such domain").encode())
            assert admin.post("/instance/reload-bounce").status_code == 200
            wait_until(lambda: _report(t, "i-2", "bounce_ts"), timeout=60, what="second bounce from IMAP")
            wait_until(lambda: _metrics(t)["bounced"] == 2, timeout=60, what="bounced == 2")
            assert len([r for r in t.client.reports_for("i-1") if "bounce_ts" in r]) == 1
        finally:
            admin.put("/instance", json={"bounce": {"enabled": False, "imap_host": None}})
