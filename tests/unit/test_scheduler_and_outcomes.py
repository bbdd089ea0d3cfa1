from __future__ import annotations

import aiosmtplib
import pytest

from services.sender.outcomes import classify, retry_delay_s
from services.sender.scheduler import Scheduler


def test_priority_then_fifo_and_deferred() -> None:
    s = Scheduler()
    now = 1_000
    s.push("a", "low-1", 3, 1, None, now)
    s.push("a", "med-1", 2, 2, None, now)
    s.push("a", "urgent", 0, 3, None, now)
    s.push("a", "med-2", 2, 4, None, now)
    s.push("a", "later", 0, 5, now + 500, now)
    lane = s.lane("a")
    assert [lane.pop(now) for _ in range(5)] == ["urgent", "med-1", "med-2", "low-1", None]
    assert lane.next_due_ms() == now + 500
    assert lane.pop(now + 500) == "later"
    assert s.pending() == 0


def test_lanes_are_independent() -> None:
    s = Scheduler()
    assert s.push("a", "k1", 2, 1, None, 0) is True
    assert s.push("a", "k2", 2, 2, None, 0) is False
    assert s.push("b", "k3", 2, 3, None, 0) is True
    assert s.lane("b").pop(0) == "k3"
    assert s.pending() == 2


@pytest.mark.parametrize(
    ("exc", "temporary"),
    [
        (aiosmtplib.SMTPResponseException(451, "4.7.1 greylisted"), True),
        (aiosmtplib.SMTPResponseException(550, "5.1.1 unknown"), False),
        (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"), False),
        (aiosmtplib.SMTPServerDisconnected("gone"), True),
        (aiosmtplib.SMTPConnectError("refused"), True),
        (TimeoutError(), True),
        (ConnectionRefusedError(), True),
        (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no", "a@b")]), False),
        (aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(452, "full", "a@b")]), True),
    ],
)
def test_classify(exc: BaseException, temporary: bool) -> None:
    assert classify(exc).temporary is temporary


def test_recipient_refusal_reason_names_the_recipient() -> None:
    f = classify(aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no", "x@y.z")]))
    assert f.code == 550 and "x@y.z" in f.reason


def test_retry_delay_grows_with_jitter_and_cap() -> None:
    d1 = [retry_delay_s(1, 10) for _ in range(50)]
    d3 = [retry_delay_s(3, 10) for _ in range(50)]
    assert all(8 <= d <= 12 for d in d1)
    assert all(32 <= d <= 48 for d in d3)
    assert len(set(d1)) > 1  # jittered
    assert retry_delay_s(30, 10, cap_s=100) <= 120
