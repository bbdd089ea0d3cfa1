"""Per-campaign counts (services/metrics/campaigns.py) on the embedded ClickHouse store."""

from __future__ import annotations

import time
from typing import Any

from services.metrics import campaigns
from services.metrics.store import Store, event_row

NOW = int(time.time() * 1000)


def ev(eid: str, type_: str, mid: str, tenant: str = "t1", **kw: Any) -> list[Any]:
    return event_row({"event_id": eid, "type": type_, "tenant_id": tenant, "message_id": mid, "ts": NOW - 1000,
                      "sender_domain": "a.test", "recipient": "x@rcpt.test", **kw})


def test_counts_per_campaign_by_message_id_prefix(store: Store) -> None:
    rows = [
        ev("e1", "sent", "campaign-7-1", batch_code="campaign-7"),
        ev("e2", "sent", "campaign-7-2", batch_code="campaign-7"),
        ev("e3", "sent", "campaign-7-3", batch_code="campaign-7"),
        ev("e4", "bounce", "campaign-7-2", bounce_type="hard"),  # feedback: no batch code
        ev("e5", "bounce", "campaign-7-3", bounce_type="soft"),
        ev("e6", "open", "campaign-7-1"), ev("e6b", "open", "campaign-7-1"),
        ev("e7", "click", "campaign-7-1"),
        ev("e8", "unsubscribe", "campaign-7-3"),
        ev("e9", "complaint", "campaign-7-1"),
        ev("e10", "sent", "campaign-70-1"),
        ev("e11", "sent", "m-not-a-campaign"),
        ev("e12", "sent", "campaign-7-9", tenant="t2"),  # another tenant's campaign 7
    ]
    store.insert_events(rows)
    store.insert_events(rows)  # replayed: not counted twice
    per = campaigns.campaign_counts(store, "t1")
    assert set(per) == {7, 70}
    assert per[7] == {"sent": 3, "delivered": 2, "bounced": 1, "complained": 1, "opened": 1, "clicked": 1,
                      "unsubscribed": 1, "failed": 0, "deferred": 0}
    assert per[70]["sent"] == 1
    assert campaigns.campaign_counts(store, "t1", [70]) == {70: per[70]}
    assert campaigns.campaign_counts(store, "t1", []) == {}
    assert campaigns.campaign_counts(store, "t2")[7]["sent"] == 1
    assert campaigns.campaign_counts(store, "t1", None, NOW + 60_000) == {}
