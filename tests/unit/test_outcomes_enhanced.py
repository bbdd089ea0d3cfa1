"""SMTP failure classification by reply code and RFC 3463 enhanced status; retry horizon."""

from __future__ import annotations

import aiosmtplib
import pytest

from services.sender.outcomes import classify, enhanced_status, gave_up, is_temporary, retry_due_ms


@pytest.mark.parametrize(
    ("code", "text", "temporary"),
    [
        (550, "5.7.1 relaying denied", False),
        (452, "4.2.2 mailbox full", True),
        (421, "4.3.2 service shutting down", True),
        (554, "5.7.1 message looks like spam", False),
        (451, "4.7.1 greylisted, try again", True),
        (550, "4.7.1 temporarily rejected", True),  # 5xx with a 4.x.x enhanced code: temporary
        (450, "5.1.1 user unknown", False),  # 4xx with a 5.x.x enhanced code: permanent
        (450, "mailbox busy", True),  # no enhanced code: the reply's first digit
        (553, "bad address", False),
    ],
)
def test_reply_and_enhanced_code(code: int, text: str, temporary: bool) -> None:
    assert is_temporary(code, text) is temporary
    assert classify(aiosmtplib.SMTPResponseException(code, text)).temporary is temporary
    refused = aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(code, text, "a@b.c")])
    assert classify(refused).temporary is temporary


def test_enhanced_status_parsing() -> None:
    assert enhanced_status("5.7.1 denied") == (5, 7, 1)
    assert enhanced_status("  4.2.2 full") == (4, 2, 2)
    assert enhanced_status("mailbox 5.1.1 unknown") is None
    assert enhanced_status(None) is None


def test_421_reconnects_and_auth_failures_are_permanent() -> None:
    f = classify(aiosmtplib.SMTPResponseException(421, "4.3.2 closing"))
    assert f.temporary and f.reset_connection
    for exc in (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"),
                aiosmtplib.SMTPResponseException(535, "5.7.8 authentication failed")):
        f = classify(exc)
        assert not f.temporary and "authentication failed" in f.reason


@pytest.mark.parametrize("exc", [TimeoutError(), ConnectionRefusedError(), ConnectionResetError(),
                                 aiosmtplib.SMTPServerDisconnected("gone"), aiosmtplib.SMTPTimeoutError("slow")])
def test_network_trouble_is_temporary(exc: BaseException) -> None:
    assert classify(exc).temporary


def test_retry_due_grows_and_stops_at_count_or_age() -> None:
    now = 1_000_000
    kw = {"base_s": 10.0, "cap_s": 3600.0, "max_attempts": 5, "max_age_s": 172800.0}
    d1 = retry_due_ms(1, now, now, **kw)
    d4 = retry_due_ms(4, now, now, **kw)
    assert d1 is not None and d4 is not None
    assert 8_000 <= d1 - now <= 12_000 and 64_000 <= d4 - now <= 96_000
    assert retry_due_ms(5, now, now, **kw) is None  # the fifth attempt was the last
    # too old: the next try would fall past the maximum age after the first one
    assert retry_due_ms(1, now, now - 172_795_000, **kw) is None
    assert gave_up("451 4.7.1 later", 5) == "451 4.7.1 later (gave up after 5 attempts)"
