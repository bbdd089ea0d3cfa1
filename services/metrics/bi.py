"""BI aggregates (issue 13, "Analysts"): cross-tenant counts over any window, from an hourly
aggregating materialized view over ``events``.

``bi_hourly`` (AggregatingMergeTree) holds, per UTC hour, tenant, event type, sending domain,
mailbox provider, campaign and account, the ``uniqExact`` state of the 64-bit hashes of
``(tenant_id, message_id)``. A 30-day query merges those states instead of reading the events:

- counts are distinct messages per type (a message deferred three times counts once), exact even
  when a batch is loaded twice (a re-loaded message hash joins a set that already holds it);
- hashes, not the id strings: the sets are 8 bytes per message and merge several times faster
  (a 64-bit collision among 10 million ids has a probability of about 3e-6);
- ``delivered`` = sent in the window and not hard-bounced in the window, computed exactly from two
  set unions: ``|sent union bounced| - |bounced|``;
- ``errors`` = messages with an ``error`` or ``rejected`` event (one set union);
- ``bounced`` counts hard bounces (soft ones are kept as ``soft_bounce``, as in analytics.py).

Campaign: the ``campaign-<id>`` prefix of the message id (provider-API campaigns, whose engagement
events carry no batch code, see campaigns.py), else the message's batch code, else ``''``.

Filled by the view for every insert into ``events`` and, once, for the events already there when
the table is created (``backfill``: an ``INSERT ... SELECT`` recorded in ``bi_backfill``). A replay
drops these tables with the others (store.DROP) and recreates them empty: the backfill then reads
an empty ``events`` and the view refills them while the topic is re-read, so the answers are the
same. Running the backfill twice would not change an answer either (the states are sets).

Window: the whole UTC hours that overlap ``[from_ts, to_ts]`` (epoch seconds); day buckets merge
the hourly rows of each UTC day."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.metrics.analytics import _provider_sql

BACKFILL_VERSION = 1
MAX_WINDOW_S = 400 * 86400  # the analytics retention default; older hours are gone anyway
MAX_TOP = 100
DEFAULT_TOP = 10
BUCKETS = {"hour": 3600, "day": 86400}
# group_by -> column of bi_hourly
DIMENSIONS: dict[str, str] = {
    "tenant": "tenant_id",
    "domain": "sender_domain",
    "provider": "provider",
    "campaign": "campaign",
    "account": "account_id",
}
# output count -> the event types whose message sets it unions
COUNTS: dict[str, tuple[str, ...]] = {
    "sent": ("sent",),
    "bounced": ("bounce",),
    "complained": ("complaint",),
    "opened": ("open",),
    "clicked": ("click",),
    "deferred": ("deferred",),
    "errors": ("error", "rejected"),
    "_sent_or_bounced": ("sent", "bounce"),  # -> delivered = this - bounced
}
FIELDS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors")
TYPES = sorted({t for types in COUNTS.values() for t in types})

_CAMPAIGN_SQL = "coalesce(nullIf(extract(message_id, '^(campaign-[0-9]+)-'), ''), batch_code)"
# the view's SELECT; the backfill runs the same one over the existing events
_SELECT = f"""
    SELECT toStartOfHour(ts) AS hour, tenant_id,
           if(type = 'bounce' AND bounce_type = 'soft', 'soft_bounce', type) AS type,
           sender_domain, {_provider_sql("recipient_domain")} AS provider,
           {_CAMPAIGN_SQL} AS campaign, account_id,
           uniqExactState(cityHash64(tenant_id, message_id)) AS messages
    FROM events
    GROUP BY hour, tenant_id, type, sender_domain, provider, campaign, account_id
"""


def ddl(retention_days: int) -> list[str]:
    """Created after analytics.ddl (which adds ``events.recipient_domain``)."""
    return [
        f"""
        CREATE TABLE IF NOT EXISTS bi_hourly (
            hour DateTime('UTC'),
            tenant_id String,
            type LowCardinality(String),
            sender_domain String,
            provider LowCardinality(String),
            campaign String,
            account_id String,
            messages AggregateFunction(uniqExact, UInt64)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (hour, tenant_id, type, sender_domain, provider, campaign, account_id)
        TTL hour + INTERVAL {int(retention_days)} DAY
        """,
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS bi_hourly_mv TO bi_hourly AS {_SELECT}",
        """
        CREATE TABLE IF NOT EXISTS bi_backfill (
            version UInt32,
            rows UInt64,
            done_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree
        ORDER BY version
        """,
    ]


DROP = ["DROP VIEW IF EXISTS bi_hourly_mv", "DROP TABLE IF EXISTS bi_hourly", "DROP TABLE IF EXISTS bi_backfill"]


def backfill(client: Any) -> bool:
    """Fill ``bi_hourly`` from the events loaded before it existed, once (recorded in
    ``bi_backfill``). Returns whether it ran. ``client``: a clickhouse-connect client (the
    caller holds the store's lock)."""
    done = client.query("SELECT count() FROM bi_backfill WHERE version = {v:UInt32}",
                        parameters={"v": BACKFILL_VERSION}).result_rows[0][0]
    if int(done):
        return False
    rows = int(client.query("SELECT count() FROM events").result_rows[0][0])
    if rows:
        client.command(f"INSERT INTO bi_hourly {_SELECT}")
    client.insert("bi_backfill", [[BACKFILL_VERSION, rows]], column_names=["version", "rows"])
    return True


@dataclass(frozen=True)
class Query:
    from_ts: int
    to_ts: int
    bucket: str = "hour"
    group_by: str | None = None
    top: int = DEFAULT_TOP
    tenant_id: str | None = None


def validate(q: Query, now_s: int | None = None) -> None:
    """Raises ValueError with a message fit for a client."""
    if q.bucket not in BUCKETS:
        raise ValueError("bucket must be hour or day")
    if q.group_by is not None and q.group_by not in DIMENSIONS:
        raise ValueError("group_by must be one of " + ", ".join(DIMENSIONS))
    if not 1 <= q.top <= MAX_TOP:
        raise ValueError(f"top must be between 1 and {MAX_TOP}")
    if q.from_ts < 0 or q.to_ts < 0:
        raise ValueError("from_ts and to_ts must be epoch seconds")
    if q.to_ts <= q.from_ts:
        raise ValueError("to_ts must be after from_ts")
    if q.to_ts - q.from_ts > MAX_WINDOW_S:
        raise ValueError(f"the window must be at most {MAX_WINDOW_S // 86400} days")
    now = int(time.time()) if now_s is None else now_s
    if q.from_ts > now + 86400:
        raise ValueError("from_ts is in the future")
    if q.tenant_id is not None and not q.tenant_id:
        raise ValueError("tenant_id must not be empty")


def _count_columns() -> str:
    cols = []
    for name, types in COUNTS.items():
        cond = f"type = '{types[0]}'" if len(types) == 1 else f"type IN ({', '.join(repr(t) for t in types)})"
        cols.append(f"uniqExactMergeIf(messages, {cond}) AS {name}")
    return ", ".join(cols)


def build(q: Query) -> dict[str, tuple[str, dict[str, Any]]]:
    """The SQL of the three parts of an answer: ``totals``, ``series`` and (with group_by)
    ``groups``, each as (sql, parameters). Values are bound parameters; the only interpolated
    names come from the fixed tables above."""
    where = ["hour >= toStartOfHour(toDateTime({f:Int64}, 'UTC'))", "hour <= toDateTime({t:Int64}, 'UTC')",
             f"type IN ({', '.join(repr(t) for t in TYPES)})"]
    params: dict[str, Any] = {"f": int(q.from_ts), "t": int(q.to_ts)}
    if q.tenant_id is not None:
        where.append("tenant_id = {tenant:String}")
        params["tenant"] = q.tenant_id
    cond = " AND ".join(where)
    counts = _count_columns()
    bucket = "hour" if q.bucket == "hour" else "toStartOfDay(hour)"
    out = {
        "totals": (f"SELECT {counts} FROM bi_hourly WHERE {cond}", dict(params)),
        "series": (f"SELECT toUnixTimestamp({bucket}) AS b, {counts} FROM bi_hourly WHERE {cond} "
                   "GROUP BY b ORDER BY b", dict(params)),
    }
    if q.group_by is not None:
        key = DIMENSIONS[q.group_by]
        out["groups"] = (f"SELECT {key} AS g, {counts} FROM bi_hourly WHERE {cond} "
                         "GROUP BY g ORDER BY sent DESC, g LIMIT {top:UInt32}", {**params, "top": int(q.top)})
    return out


def _counts(row: tuple[Any, ...] | list[Any]) -> dict[str, int]:
    raw = dict(zip(COUNTS, (int(v) for v in row), strict=True))
    out = {f: raw.get(f, 0) for f in FIELDS}
    out["delivered"] = max(0, raw["_sent_or_bounced"] - raw["bounced"])
    return out


def empty_counts() -> dict[str, int]:
    return {f: 0 for f in FIELDS}


def bucket_starts(q: Query) -> list[int]:
    """Every bucket start (epoch s) of the window, for a gap-free series."""
    step = BUCKETS[q.bucket]
    first = q.from_ts // step * step
    return list(range(first, q.to_ts + 1, step))


def run(store: Any, q: Query) -> dict[str, Any]:
    """The answer of ``GET /internal/bi/metrics``. ``store``: a :class:`services.metrics.store.Store`."""
    validate(q)
    sql = build(q)
    with store._lock:
        totals = store._client.query(sql["totals"][0], parameters=sql["totals"][1]).result_rows
        series = store._client.query(sql["series"][0], parameters=sql["series"][1]).result_rows
        groups = (store._client.query(sql["groups"][0], parameters=sql["groups"][1]).result_rows
                  if "groups" in sql else [])
    by_bucket = {int(r[0]): _counts(r[1:]) for r in series}
    return {
        "from_ts": q.from_ts, "to_ts": q.to_ts, "bucket": q.bucket, "group_by": q.group_by,
        "totals": _counts(totals[0]) if totals else empty_counts(),
        "series": [{"ts": b, **by_bucket.get(b, empty_counts())} for b in bucket_starts(q)],
        "groups": [{"key": str(r[0]), **_counts(r[1:])} for r in groups],
    }
