"""Per-campaign counts (provider API campaigns, services/api/provider/campaigns.py).

A campaign's messages have the ids ``campaign-<id>-<member_id>`` (and ``batch_code``
``campaign-<id>``); engagement and feedback events (opens, clicks, unsubscribes, bounces,
complaints) carry the message id but no batch code, so a campaign's events are found by the id
prefix. Counts are distinct messages per event type, like the tenant totals: ``bounced`` counts
hard bounces only, ``delivered`` is sent and never hard-bounced."""

from __future__ import annotations

from typing import Any

CAMPAIGN_FIELDS: dict[str, str] = {
    "sent": "sent",
    "bounce": "bounced",
    "complaint": "complained",
    "open": "opened",
    "click": "clicked",
    "unsubscribe": "unsubscribed",
    "error": "failed",
    "deferred": "deferred",
}
MAX_IDS = 1000


def empty() -> dict[str, int]:
    out = {field: 0 for field in CAMPAIGN_FIELDS.values()}
    out["delivered"] = 0
    return out


def campaign_counts(store: Any, tenant_id: str, campaign_ids: list[int] | None = None,
                    from_ms: int | None = None) -> dict[int, dict[str, int]]:
    """{campaign id: counts} of the tenant's campaigns (all of them, or ``campaign_ids``), over all
    time or from ``from_ms``. ``store`` is a :class:`services.metrics.store.Store`."""
    where = ["tenant_id = {tenant:String}", "startsWith(message_id, 'campaign-')"]
    params: dict[str, Any] = {"tenant": tenant_id}
    if from_ms is not None:
        where.append("ts >= fromUnixTimestamp64Milli({f:Int64}, 'UTC')")
        params["f"] = int(from_ms)
    cid = "toUInt64OrZero(extract(message_id, '^campaign-([0-9]+)-'))"
    having = ""
    if campaign_ids is not None:
        if not campaign_ids:
            return {}
        having = "HAVING cid IN {ids:Array(UInt64)}"
        params["ids"] = [int(i) for i in campaign_ids][:MAX_IDS]
    cond = " AND ".join(where)
    with store._lock:
        rows = store._client.query(
            f"""
            SELECT {cid} AS cid, type, uniqExact(message_id)
            FROM events
            WHERE {cond} AND NOT (type = 'bounce' AND bounce_type = 'soft')
            GROUP BY cid, type {having}
            """, parameters=params).result_rows
        delivered = store._client.query(
            f"""
            SELECT {cid} AS cid, uniqExactIf(message_id, type = 'sent')
            FROM events
            WHERE {cond}
              AND message_id NOT IN (SELECT message_id FROM events WHERE tenant_id = {{tenant:String}}
                                     AND startsWith(message_id, 'campaign-')
                                     AND type = 'bounce' AND bounce_type != 'soft')
            GROUP BY cid {having}
            """, parameters=params).result_rows
    out: dict[int, dict[str, int]] = {}
    for c, type_, n in rows:
        if int(c) and str(type_) in CAMPAIGN_FIELDS:
            out.setdefault(int(c), empty())[CAMPAIGN_FIELDS[str(type_)]] = int(n)
    for c, n in delivered:
        if int(c):
            out.setdefault(int(c), empty())["delivered"] = int(n)
    return out
