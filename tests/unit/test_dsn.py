"""Bounce parsing and classification on realistic DSNs (Postfix, Exim, Gmail, Microsoft) and on
non-standard bounces."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.inbound.classify import Analysis, analyse
from services.inbound.correlate import Target, events_for
from services.inbound.dsn import Bounce, classify_status, classify_text

ORIGINAL = (
    "From: app@acme.test\r\nTo: bob@example.test\r\nSubject: Hello\r\n"
    "Message-ID: <0b7c-pk@acme.test>\r\nX-Postbus-Message-Id: m-1\r\nX-Postbus-Tenant: acme\r\n"
)

POSTFIX = (
    "From: MAILER-DAEMON@mx.acme.test (Mail Delivery System)\r\n"
    "To: bounces@acme.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n\r\n'
    "--B1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients.\r\n\r\n"
    "<bob@example.test>: host mx.example.test[192.0.2.1] said: 550 5.1.1\r\n"
    "    <bob@example.test>: Recipient address rejected: User unknown in virtual\r\n    mailbox table\r\n\r\n"
    "--B1\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
    "Reporting-MTA: dns; mx.acme.test\r\nX-Postfix-Queue-ID: 4F1C2\r\n"
    "Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n"
    "Final-Recipient: rfc822; bob@example.test\r\nOriginal-Recipient: rfc822;bob@example.test\r\n"
    "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.example.test\r\n"
    "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.test>: Recipient address rejected:\r\n"
    "    User unknown in virtual mailbox table\r\n\r\n"
    "--B1\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    + ORIGINAL + "\r\n--B1--\r\n"
)


def test_postfix_dsn_hard_bounce_with_original_headers() -> None:
    a = analyse(POSTFIX.encode())
    assert a.kind == "bounce" and a.method == "dsn"
    [b] = a.bounces
    assert b.recipient == "bob@example.test"
    assert b.bounce_type == "hard" and b.code == "5.1.1" and b.action == "failed"
    assert b.reason.startswith("550 5.1.1 <bob@example.test>: Recipient address rejected")
    assert "User unknown in virtual mailbox table" in b.reason
    assert (a.hint.tenant_id, a.hint.message_id, a.hint.rfc_message_id) == ("acme", "m-1", "<0b7c-pk@acme.test>")


GMAIL_DELAYED = (
    "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\nTo: bounces@acme.test\r\n"
    "Subject: Delivery Status Notification (Delay)\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; boundary="g1"; report-type=delivery-status\r\n\r\n'
    "--g1\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\n"
    "This is an automatically generated Delivery Status Notification\r\n"
    "Delivery to the following recipient has been delayed:\r\n\r\n     full@example.test\r\n\r\n"
    "--g1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; googlemail.com\r\n\r\n"
    "Final-Recipient: rfc822; full@example.test\r\nAction: delayed\r\nStatus: 4.2.2\r\n"
    "Diagnostic-Code: smtp; 452 4.2.2 The email account that you tried to reach is over quota.\r\n"
    "Will-Retry-Until: Tue, 2 Jan 2024 10:00:00 -0800 (PST)\r\n\r\n"
    "--g1\r\nContent-Type: message/rfc822\r\n\r\n" + ORIGINAL + "\r\nbody\r\n--g1--\r\n"
)


def test_gmail_style_delay_is_soft_and_correlates_through_the_embedded_message() -> None:
    a = analyse(GMAIL_DELAYED.encode())
    [b] = a.bounces
    assert b.bounce_type == "soft" and b.code == "4.2.2" and b.recipient == "full@example.test"
    assert "over quota" in b.reason
    assert a.hint.message_id == "m-1" and a.hint.tenant_id == "acme"


MICROSOFT = (
    "From: postmaster@outlook.com\r\nTo: bounces@acme.test\r\nSubject: Undeliverable: Hello\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="ms_b"\r\n\r\n'
    "--ms_b\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>Delivery has failed to these recipients</p>\r\n"
    "--ms_b\r\nContent-Type: message/delivery-status\r\n\r\n"
    "Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.outlook.com\r\n"
    "Received-From-MTA: dns;acme.test\r\n\r\n"
    "Original-Recipient: rfc822;Carol@Contoso.test\r\nFinal-Recipient: rfc822;Carol@Contoso.test\r\n"
    "Action: failed\r\nStatus: 5.2.2\r\n"
    "Diagnostic-Code: smtp;554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException\r\n\r\n"
    "Final-Recipient: rfc822;dave@contoso.test\r\nAction: failed\r\nStatus: 5.4.1\r\n"
    "Diagnostic-Code: smtp;550 5.4.1 Recipient address rejected: Access denied\r\n\r\n"
    "--ms_b\r\nContent-Type: text/rfc822-headers\r\n\r\n" + ORIGINAL + "\r\n--ms_b--\r\n"
)


def test_microsoft_style_dsn_two_recipients_mailbox_full_is_soft() -> None:
    a = analyse(MICROSOFT.encode())
    assert [(b.recipient, b.bounce_type, b.code) for b in a.bounces] == [
        ("carol@contoso.test", "soft", "5.2.2"), ("dave@contoso.test", "hard", "5.4.1")]


EXIM = (
    "From: Mail Delivery System <Mailer-Daemon@mx.acme.test>\r\nTo: bounces@acme.test\r\n"
    "Subject: Mail delivery failed: returning message to sender\r\nX-Failed-Recipients: erin@example.test\r\n"
    "Auto-Submitted: auto-replied\r\n\r\n"
    "This message was created automatically by mail delivery software.\r\n\r\n"
    "A message that you sent could not be delivered to one or more of its\r\n"
    "recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
    "  erin@example.test\r\n    host mx.example.test [192.0.2.7]\r\n"
    "    SMTP error from remote mail server after RCPT TO:<erin@example.test>:\r\n"
    "    550 No such user here\r\n\r\n"
    "------ This is a copy of the message, including all the headers. ------\r\n\r\n"
    + ORIGINAL + "\r\nbody\r\n"
)


def test_exim_plain_text_bounce_by_heuristics_and_inline_headers() -> None:
    a = analyse(EXIM.encode(), envelope_from="")
    assert a.kind == "bounce" and a.method == "heuristic"
    [b] = a.bounces
    assert b.recipient == "erin@example.test" and b.bounce_type == "hard" and b.code == "550"
    assert a.hint.message_id == "m-1" and a.hint.tenant_id == "acme"


def test_non_standard_bounce_phrases() -> None:
    raw = (b"From: postmaster@old.example\r\nSubject: Returned mail: see transcript\r\n\r\n"
           b"Your message to frank@old.example could not be delivered:\r\nMailbox quota exceeded for this user\r\n")
    a = analyse(raw)
    [b] = a.bounces
    assert b.bounce_type == "soft" and b.recipient == "frank@old.example" and b.code is None


def test_success_dsn_and_ordinary_mail_are_not_bounces() -> None:
    ok = POSTFIX.replace("Action: failed", "Action: delivered").replace("Status: 5.1.1", "Status: 2.0.0")
    assert analyse(ok.encode()).bounces == []
    assert analyse(b"From: someone@x.test\r\nSubject: hi\r\n\r\nhello 550 there\r\n").kind == "unknown"


def test_classification_rules() -> None:
    assert classify_status("5.1.1") == "hard"
    assert classify_status("5.1.2") == "hard"  # no such domain
    assert classify_status("4.4.1") == "soft"
    assert classify_status("5.2.2") == "soft"
    assert classify_status("5.7.1", action="delayed") == "soft"
    assert classify_text("550 5.1.1 user unknown") == ("hard", "5.1.1")
    assert classify_text("421 try again later") == ("soft", "421")
    assert classify_text("Host or domain name not found. Name service error: no such domain") == ("hard", None)


def _target(*recipients: str) -> Target:
    return Target("acme", "m-1", "0b7c-pk", "main", "acme.test", frozenset(recipients))


def _refused(kind: str, reason: str) -> float:
    return REGISTRY.get_sample_value("postbus_inbound_feedback_refused_total", {"kind": kind, "reason": reason}) or 0.0


def test_bounce_events_only_for_recipients_of_the_message() -> None:
    a = analyse(POSTFIX.encode())  # names bob@example.test
    [ev] = events_for(a, _target("bob@example.test", "carol@example.test"), "raw", "smtp")
    assert ev["recipient"] == "bob@example.test" and ev["bounce_type"] == "hard"
    # the same report about a message bob did not receive: no event, counted as refused
    before = _refused("bounce", "not_a_recipient")
    assert events_for(a, _target("carol@example.test"), "raw", "smtp") == []
    assert _refused("bounce", "not_a_recipient") == before + 1
    # recipients unknown (an old metrics answer): nothing attributed
    assert events_for(a, Target("acme", "m-1", None, None, None, None), "raw", "smtp") == []


def test_bounce_without_a_named_recipient_goes_to_the_only_recipient() -> None:
    a = analyse(MICROSOFT.encode())
    assert [b.recipient for b in a.bounces] == ["carol@contoso.test", "dave@contoso.test"]
    nameless = Analysis("bounce", "heuristic", a.hint, [Bounce(None, "hard", "550", "user unknown")])
    [ev] = events_for(nameless, _target("solo@example.test"), "raw", "smtp")
    assert ev["recipient"] == "solo@example.test"
    before = _refused("bounce", "no_recipient")
    assert events_for(nameless, _target("carol@contoso.test", "dave@contoso.test"), "raw", "smtp") == []
    assert _refused("bounce", "no_recipient") == before + 1
    # a two-recipient DSN about a message sent to one of them: only that one
    [ev] = events_for(a, _target("dave@contoso.test"), "raw", "smtp")
    assert ev["recipient"] == "dave@contoso.test" and ev["bounce_type"] == "hard"
