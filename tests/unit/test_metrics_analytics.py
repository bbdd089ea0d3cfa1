"""Hourly aggregating analytics (embedded ClickHouse): windows, per domain / provider, idempotent loading."""

from __future__ import annotations

import time
from typing import Any

from services.metrics import analytics
from services.metrics.store import Store, event_row

HOUR = 3_600_000
NOW = int(time.time() * 1000)


def ev(eid: str, type_: str, mid: str, ts: int, domain: str, rcpt: str | None, **kw: Any) -> list[Any]:
    return event_row({"event_id": eid, "type": type_, "tenant_id": kw.pop("tenant", "t1"), "message_id": mid,
                      "ts": ts, "sender_domain": domain, "recipient": rcpt, **kw})


def test_provider_mapping() -> None:
    assert analytics.provider_of("gmail.com") == analytics.provider_of("GoogleMail.com") == "google"
    assert {analytics.provider_of(d) for d in ("outlook.com", "hotmail.com", "live.com")} == {"microsoft"}
    assert analytics.provider_of("yahoo.com") == "yahoo"
    assert analytics.provider_of("example.org") == "example.org"
    assert analytics.provider_of("") == "unknown"
    assert analytics.recipient_domain({"recipient": "Bob <bob@Gmail.com>"}) == "gmail.com"


def test_grouped_windows_are_exact_and_idempotent(store: Store) -> None:
    rows = [
        ev("e1", "sent", "m1", NOW - HOUR, "a.test", "x@gmail.com"),
        ev("e2", "sent", "m2", NOW - 2 * HOUR, "a.test", "y@hotmail.com"),
        ev("e3", "bounce", "m2", NOW - 2 * HOUR, "a.test", "y@hotmail.com", bounce_type="hard"),
        ev("e4", "bounce", "m1", NOW - HOUR, "a.test", "x@gmail.com", bounce_type="soft"),
        ev("e5", "sent", "m3", NOW - 3 * 24 * HOUR, "b.test", "z@corp.example"),
        ev("e6", "sent", "m4", NOW - HOUR, "b.test", "q@gmail.com", tenant="t2"),
        ev("e7", "sent", "m5", NOW - 10, "b.test", None),
    ]
    store.insert_events(rows)
    store.insert_events(rows[:3])  # a replayed batch: not counted twice

    _, _, by_domain = analytics.grouped_counts(store, "t1", 24, "domain")
    assert by_domain == {"a.test": {"sent": 2, "bounce": 1, "soft_bounce": 1}, "b.test": {"sent": 1}}
    _, _, by_domain = analytics.grouped_counts(store, "t1", 7 * 24, "domain")
    assert by_domain["b.test"] == {"sent": 2}
    _, _, by_provider = analytics.grouped_counts(store, "t1", 7 * 24, "provider")
    assert by_provider == {"google": {"sent": 1, "soft_bounce": 1}, "microsoft": {"sent": 1, "bounce": 1},
                           "corp.example": {"sent": 1}, "unknown": {"sent": 1}}
    _, _, total = analytics.grouped_counts(store, "t1", 24, None)
    assert total == {"": {"sent": 3, "bounce": 1, "soft_bounce": 1}}
    assert analytics.grouped_counts(store, "t-none", 24, "domain")[2] == {}


def test_window_bounds_are_whole_hours() -> None:
    start, end = analytics.window_bounds(24, 100 * HOUR + 123)
    assert (start, end) == (76 * HOUR, 100 * HOUR + 123)
