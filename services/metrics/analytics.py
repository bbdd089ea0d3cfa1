"""Deliverability analytics: an hourly aggregating materialized view over ``events``.

``analytics_hourly`` (AggregatingMergeTree) holds, per tenant, UTC hour, event type, sending
domain (the From domain) and mailbox provider, the ``uniqExact`` state of the message ids. Every
window (``Nh``/``Nd`` up to the retention) is a merge of at most ``hours`` rows per group, so a
query reads a few thousand rows instead of millions of events. The states make loading idempotent:
a replayed event adds its message id to a set that already holds it, so it is not counted twice.
Windows are whole UTC hours: ``24h`` is the current hour and the 24 before it.

Soft bounces are kept apart as ``soft_bounce`` (``bounced`` counts hard bounces, like the
tenant totals). Mailbox provider: the recipient's domain (the ``recipient`` of the event; for a ``sent`` event the
first To address) grouped by :data:`PROVIDERS`; any other domain is its own provider, and an event
without a recipient is ``unknown``. TTL: the rows go with the analytics retention."""

from __future__ import annotations

import time
from typing import Any

# documented provider mapping (README "Analytics"): recipient domain -> provider
PROVIDERS: dict[str, tuple[str, ...]] = {
    "google": ("gmail.com", "googlemail.com"),
    "microsoft": ("outlook.com", "hotmail.com", "live.com", "msn.com", "outlook.it", "hotmail.it", "live.it",
                  "hotmail.co.uk", "live.co.uk", "outlook.fr", "hotmail.fr", "live.fr", "hotmail.de", "outlook.de"),
    "yahoo": ("yahoo.com", "yahoo.it", "yahoo.co.uk", "yahoo.fr", "yahoo.de", "ymail.com", "rocketmail.com",
              "aol.com"),
    "apple": ("icloud.com", "me.com", "mac.com"),
}
GROUPS = {"domain": "sender_domain", "provider": "provider"}


def provider_of(recipient_domain: str) -> str:
    d = recipient_domain.strip().lower()
    if not d:
        return "unknown"
    for name, domains in PROVIDERS.items():
        if d in domains:
            return name
    return d


def _provider_sql(column: str) -> str:
    branches = ", ".join(f"{column} IN ({', '.join(repr(d) for d in domains)}), '{name}'"
                         for name, domains in PROVIDERS.items())
    return f"multiIf({column} = '', 'unknown', {branches}, {column})"


def recipient_domain(ev: dict[str, Any]) -> str:
    return str(ev.get("recipient") or "").rpartition("@")[2].strip().rstrip(">").lower()


def ddl(retention_days: int) -> list[str]:
    return [
        # events written before this column existed read as '' (provider "unknown")
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS recipient_domain String DEFAULT ''",
        # the view tells soft bounces apart (the inbound parser fills it; same definition as store.py)
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS bounce_type LowCardinality(String) DEFAULT ''",
        f"""
        CREATE TABLE IF NOT EXISTS analytics_hourly (
            tenant_id String,
            hour DateTime('UTC'),
            type LowCardinality(String),
            sender_domain String,
            provider LowCardinality(String),
            messages AggregateFunction(uniqExact, String)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (tenant_id, hour, type, sender_domain, provider)
        TTL hour + INTERVAL {int(retention_days)} DAY
        """,
        f"""
        CREATE MATERIALIZED VIEW IF NOT EXISTS analytics_hourly_mv TO analytics_hourly AS
        SELECT tenant_id, toStartOfHour(ts) AS hour,
               if(type = 'bounce' AND bounce_type = 'soft', 'soft_bounce', type) AS type, sender_domain,
               {_provider_sql("recipient_domain")} AS provider,
               uniqExactState(message_id) AS messages
        FROM events
        GROUP BY tenant_id, hour, type, sender_domain, provider
        """,
    ]


DROP = ["DROP VIEW IF EXISTS analytics_hourly_mv", "DROP TABLE IF EXISTS analytics_hourly"]


def window_bounds(hours: int, now_ms: int | None = None) -> tuple[int, int]:
    """(from_ms, to_ms): from the start of the hour ``hours`` ago to now."""
    now = int(now_ms if now_ms is not None else time.time() * 1000)
    start = (now - hours * 3_600_000) // 3_600_000 * 3_600_000
    return start, now


def grouped_counts(store: Any, tenant_id: str, hours: int, group_by: str | None,
                   now_ms: int | None = None) -> tuple[int, int, dict[str, dict[str, int]]]:
    """Distinct messages per event type over the window, per group (``""`` when not grouped).
    ``store`` is a :class:`services.metrics.store.Store`."""
    from_ms, to_ms = window_bounds(hours, now_ms)
    key = GROUPS[group_by] if group_by else "''"
    with store._lock:
        res = store._client.query(
            f"""
            SELECT {key} AS g, type, uniqExactMerge(messages)
            FROM analytics_hourly
            WHERE tenant_id = {{tenant:String}}
              AND hour >= toDateTime(intDiv({{f:Int64}}, 1000), 'UTC')
            GROUP BY g, type
            """,
            parameters={"tenant": tenant_id, "f": from_ms},
        )
    out: dict[str, dict[str, int]] = {}
    for g, type_, n in res.result_rows:
        out.setdefault(str(g), {})[str(type_)] = int(n)
    return from_ms, to_ms, out
