"""The outbound quota rules: reasons for hard/soft enforcement, rollover, rates, reader counters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.common import domain_quota as q


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def entry(**kw: object) -> dict:
    e = q.new_entry("example.com", "t1", 3, ms("2024-05-31T23:59:00"))
    e.update(kw)
    return e


def test_period_is_utc() -> None:
    assert q.period(ms("2024-05-31T23:59:59")) == ("2024-05-31", "2024-05")
    assert q.period(ms("2024-06-01T00:00:00")) == ("2024-06-01", "2024-06")


@pytest.mark.parametrize(("fields", "reason"), [
    ({"status": "suspended"}, "outbound_suspended"),
    ({"daily": 2, "today": 2, "msent": 2}, "daily_limit_exceeded"),
    ({"monthly": 5, "today": 0, "msent": 5}, "monthly_limit_exceeded"),
])
def test_hard_rejects_without_counting_and_soft_allows_and_counts(fields: dict, reason: str) -> None:
    hard = entry(enf="hard", **fields)
    before = (hard["today"], hard["msent"])
    assert q.decide(hard) == (False, reason)
    assert (hard["today"], hard["msent"]) == before
    soft = entry(enf="soft", **fields)
    assert q.decide(soft) == (True, reason + "_soft")
    assert (soft["today"], soft["msent"]) == (before[0] + 1, before[1] + 1)


def test_zero_means_unlimited_and_limit_is_inclusive() -> None:
    e = entry(enf="hard", daily=2)
    assert q.decide(e) == (True, None)
    assert q.decide(e) == (True, None)
    assert q.decide(e) == (False, "daily_limit_exceeded")
    unlimited = entry(enf="hard", today=10**6, msent=10**6)
    assert q.decide(unlimited) == (True, None)


def test_rollover_is_idempotent_and_freezes_the_ended_month() -> None:
    e = entry(today=4, msent=40, bounce=2, monthly=100)
    assert q.roll(e, ms("2024-05-31T23:59:30")) is None  # same day: nothing
    assert e["today"] == 4
    billing = q.roll(e, ms("2024-06-01T00:00:05"))
    assert billing is not None
    assert billing["month"] == "2024-05" and billing["outbound_sent_month"] == 40 and billing["bounce_rate"] == 5.0
    assert billing["partner_ref"] == "t1" and billing["cause"] == "rollover"
    assert (e["today"], e["msent"], e["bounce"], e["day"], e["month"]) == (0, 0, 0, "2024-06-01", "2024-06")
    assert q.roll(e, ms("2024-06-01T00:00:06")) is None  # a second tick is a no-op
    # a clock going back never un-rolls
    assert q.roll(e, ms("2024-05-31T23:00:00")) is None and e["month"] == "2024-06"


def test_rates_are_percentages() -> None:
    assert q.rate(0, 0) == 0.0
    assert q.rate(3, 100) == 3.0
    assert q.rate(1, 3) == pytest.approx(33.3333)


def test_reader_counters_zero_a_stale_snapshot() -> None:
    snap = q.status_record(entry(today=5, msent=50, bounce=1), ms("2024-05-31T23:59:00"))
    assert q.counters_at(snap, ms("2024-05-31T23:59:59"))["sent_today"] == 5
    nextday = q.counters_at(snap, ms("2024-06-01T00:00:01"))
    assert nextday == {"sent_today": 0, "sent_month": 0, "bounce_count": 0, "complaint_count": 0}
    assert q.counters_at(None, 0)["sent_month"] == 0
