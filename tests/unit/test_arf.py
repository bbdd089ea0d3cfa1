"""ARF complaint reports (RFC 5965), as sent by mailbox providers' feedback loops."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.inbound.classify import analyse
from services.inbound.correlate import Target, events_for

ARF = (
    "From: <staff@hotmail.example>\r\nTo: <abuse@acme.test>\r\nSubject: FW: Hello\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="part1_13d.2e68ed54_boundary"\r\n\r\n'
    "--part1_13d.2e68ed54_boundary\r\nContent-Type: text/plain; charset=\"US-ASCII\"\r\n\r\n"
    "This is an email abuse report for an email message received from IP 192.0.2.2\r\n\r\n"
    "--part1_13d.2e68ed54_boundary\r\nContent-Type: message/feedback-report\r\n\r\n"
    "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
    "Original-Mail-From: <bounces@acme.test>\r\nOriginal-Rcpt-To: <Bob@Example.test>\r\n"
    "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\nSource-IP: 192.0.2.2\r\n\r\n"
    "--part1_13d.2e68ed54_boundary\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
    "From: app@acme.test\r\nTo: bob@example.test\r\nSubject: Hello\r\nMessage-ID: <pk-9@acme.test>\r\n"
    "X-Postbus-Message-Id: m-9\r\nX-Postbus-Tenant: acme\r\n\r\nbody\r\n"
    "--part1_13d.2e68ed54_boundary--\r\n"
)


def test_arf_abuse_report() -> None:
    a = analyse(ARF.encode())
    assert a.kind == "complaint" and a.method == "arf"
    assert a.complaint is not None
    assert a.complaint.feedback_type == "abuse"
    assert a.complaint.recipient == "bob@example.test"
    assert a.complaint.user_agent == "SomeGenerator/1.0"
    assert (a.hint.tenant_id, a.hint.message_id, a.hint.rfc_message_id) == ("acme", "m-9", "<pk-9@acme.test>")


def test_arf_other_feedback_type_and_headers_only() -> None:
    raw = ARF.replace("Feedback-Type: abuse", "Feedback-Type: fraud").replace(
        "Content-Type: message/rfc822", "Content-Type: text/rfc822-headers").encode()
    a = analyse(raw)
    assert a.complaint is not None and a.complaint.feedback_type == "fraud"
    assert a.hint.message_id == "m-9"


def test_complaint_only_for_a_recipient_of_the_message() -> None:
    a = analyse(ARF.encode())  # Original-Rcpt-To: bob@example.test

    def target(*rcpts: str) -> Target:
        return Target("acme", "m-9", "pk-9", "main", "acme.test", frozenset(rcpts))

    [ev] = events_for(a, target("bob@example.test"), "raw", "smtp")
    assert ev["type"] == "complaint" and ev["recipient"] == "bob@example.test" and ev["feedback_type"] == "abuse"
    sample = {"kind": "complaint", "reason": "not_a_recipient"}
    before = REGISTRY.get_sample_value("postbus_inbound_feedback_refused_total", sample) or 0.0
    assert events_for(a, target("carol@example.test"), "raw", "smtp") == []
    assert REGISTRY.get_sample_value("postbus_inbound_feedback_refused_total", sample) == before + 1
    # a redacted report (no Original-Rcpt-To): the message's only recipient, none when it had several
    redacted = analyse(ARF.replace("Original-Rcpt-To: <Bob@Example.test>\r\n", "").encode())
    assert redacted.complaint is not None and redacted.complaint.recipient is None
    [ev] = events_for(redacted, target("bob@example.test"), "raw", "smtp")
    assert ev["recipient"] == "bob@example.test"
    assert events_for(redacted, target("bob@example.test", "carol@example.test"), "raw", "smtp") == []
