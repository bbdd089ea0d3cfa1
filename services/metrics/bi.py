"""BI aggregates (issue 13, "Analysts"): cross-tenant counts over any window, from hourly
materialized views over ``events``: event counts and distinct messages.

Two SummingMergeTree tables hold the number of events of each kind per UTC hour: ``sent``,
``bounced`` (hard bounces; soft ones are ``soft_bounced``, as in analytics.py), ``complained``,
``opened``, ``clicked``, ``deferred`` and ``errors`` (``error`` + ``rejected``):

- ``bi_tenant_hourly``, per (hour, tenant): totals, series and ``group_by=tenant``;
- ``bi_dim_hourly``, per (dimension, hour, tenant, key), each event once under each of ``domain``
  (sending domain), ``provider`` (mailbox provider), ``campaign`` and ``account``: the other groups.

A 30-day query sums at most (hours x tenants) rows, or the rows of one dimension, instead of
reading the events (one wide table keyed by all five dimensions at once had nearly a row per three
events, see docs/bi.md). ``delivered`` = ``sent - bounced`` (never below 0).

Event counts: every event counts, so a message deferred three times is three ``deferred``, every
pixel load is an ``opened``, and a batch re-loaded after a crash between its insert and its
offsets (ingest.py) counts twice until the next replay. Distinct messages (``distinct``, the
default): two AggregatingMergeTree twins with the same keys, ``bi_tenant_distinct_hourly``
(tenant, hour) and ``bi_dim_distinct_hourly`` (dimension, tenant, hour, key), hold per row a
``uniqCombined64`` state of the (tenant, message id) pairs of each figure: ``messages_sent``,
``messages_bounced`` (hard), ``messages_complained``, ``unique_opens`` and ``unique_clicks``;
``messages_delivered`` = ``messages_sent - messages_bounced`` (never below 0), as ``delivered``.
A replayed or re-loaded event adds a pair its state already holds, so it never changes them.
Merged over the window's rows they count each message once per bucket, group or window. Exact
up to 4,096 messages per figure, an estimate within about 0.5 % above: the exact ``uniqExact``
states took 2-4 s per 30-day query at 10 million events (docs/bi.md, "Exact or approximate").
The distinct figures of the buckets and of the window come from one pass (``GROUPING SETS``);
those of the groups only for the top N keys, chosen by ``sent`` events.

Campaign: the ``campaign-<id>`` prefix of the message id (provider-API campaigns, whose engagement
events carry no batch code, see campaigns.py), else the message's batch code, else ``''``.

Filled by the view for every insert into ``events`` and, once, for the events already there when
the tables are created (``backfill``: an ``INSERT ... SELECT`` recorded in ``bi_backfill``, one
version per table set, run by
``Store.create`` under the store lock before the ingest starts). A replay drops these tables with
the others (store.DROP) and recreates them: the backfill then reads an empty ``events`` and the
views refill the tables while the topic is re-read, so the answers are the same.

Window: the whole UTC hours that overlap ``[from_ts, to_ts]`` (epoch seconds); day buckets sum
the hourly rows of each UTC day."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from services.metrics.analytics import _provider_sql

BACKFILL_VERSION = 2  # 1: the first, single-table version; 2: the two summing tables
# the two distinct-message tables, recorded apart (added to stores already at 2); 3 was a first
# version with uniqExact states (bi_*_uniq_hourly, dropped by ddl)
DISTINCT_BACKFILL_VERSION = 4
MAX_WINDOW_S = 400 * 86400  # the analytics retention default; older hours are gone anyway
MAX_TOP = 100
DEFAULT_TOP = 10
BUCKETS = {"hour": 3600, "day": 86400}
# group_by values: "tenant" reads bi_tenant_hourly, the others bi_dim_hourly (column ``dim``)
DIMENSIONS = ("tenant", "domain", "provider", "campaign", "account")
# stored column -> the condition on an event that counts it
COLUMNS: dict[str, str] = {
    "sent": "type = 'sent'",
    "bounced": "type = 'bounce' AND bounce_type != 'soft'",
    "soft_bounced": "type = 'bounce' AND bounce_type = 'soft'",
    "complained": "type = 'complaint'",
    "opened": "type = 'open'",
    "clicked": "type = 'click'",
    "deferred": "type = 'deferred'",
    "errors": "type IN ('error', 'rejected')",
}
FIELDS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors")
SUMMED = tuple(c for c in COLUMNS if c != "soft_bounced")
# distinct messages: stored state column -> the condition on an event that puts its (tenant, message
# id) into the column's set. The function: exact below a few thousand messages per figure, an
# estimate within about 0.5 % above (docs/bi.md, "Exact or approximate"; uniqExact measured 2-4 s).
DISTINCT_FUNCTION = "uniqCombined64"
DISTINCT_COLUMNS: dict[str, str] = {
    "messages_sent": COLUMNS["sent"],
    "messages_bounced": COLUMNS["bounced"],
    "messages_complained": COLUMNS["complained"],
    "unique_opens": COLUMNS["opened"],
    "unique_clicks": COLUMNS["clicked"],
}
DISTINCT_FIELDS = ("messages_sent", "messages_delivered", "messages_bounced", "messages_complained",
                   "unique_opens", "unique_clicks")

_CAMPAIGN_SQL = "coalesce(nullIf(extract(message_id, '^(campaign-[0-9]+)-'), ''), batch_code)"
_COUNTED = " OR ".join(f"({cond})" for cond in COLUMNS.values())
_SUMS = ", ".join(f"toUInt64(countIf({cond})) AS {col}" for col, cond in COLUMNS.items())
_COLUMNS_DDL = "".join(f"            {col} UInt64,\n" for col in COLUMNS).rstrip(",\n")
# the views' SELECTs; the backfill runs the same ones over the existing events


def _select_tenant(aggregates: str, where: str) -> str:
    """One row per (hour, tenant)."""
    return f"""
    SELECT toStartOfHour(ts) AS hour, tenant_id, {aggregates}
    FROM events
    WHERE {where}
    GROUP BY hour, tenant_id
"""


def _select_dims(aggregates: str, where: str, columns: str) -> str:
    """One row per (dimension, hour, tenant, key): each event counted once under each dimension."""
    return f"""
    SELECT d.1 AS dim, hour, tenant_id, d.2 AS key, {aggregates}
    FROM (
        SELECT toStartOfHour(ts) AS hour, tenant_id, {columns},
               arrayZip(['domain', 'provider', 'campaign', 'account'],
                        [sender_domain, {_provider_sql("recipient_domain")}, {_CAMPAIGN_SQL}, account_id]) AS dims
        FROM events
        WHERE {where}
    )
    ARRAY JOIN dims AS d
    GROUP BY dim, hour, tenant_id, key
"""


_SELECT_TENANT = _select_tenant(_SUMS, _COUNTED)
_SELECT_DIMS = _select_dims(_SUMS, _COUNTED, "type, bounce_type")

# the same two shapes with distinct-count states of (tenant_id, message_id): a replayed or
# re-loaded event adds a pair its state already holds (a hash already in the set / a register
# already at least that high), so merged over any rows the states count each message once
_DISTINCT_COUNTED = " OR ".join(f"({cond})" for cond in DISTINCT_COLUMNS.values())
_STATES = ", ".join(f"{DISTINCT_FUNCTION}StateIf(tenant_id, message_id, {cond}) AS {col}"
                    for col, cond in DISTINCT_COLUMNS.items())
_STATES_DDL = "".join(f"            {col} AggregateFunction({DISTINCT_FUNCTION}, String, String),\n"
                      for col in DISTINCT_COLUMNS).rstrip(",\n")
_SELECT_TENANT_DISTINCT = _select_tenant(_STATES, _DISTINCT_COUNTED)
_SELECT_DIMS_DISTINCT = _select_dims(_STATES, _DISTINCT_COUNTED, "message_id, type, bounce_type")

def ddl(retention_days: int) -> list[str]:
    """Created after analytics.ddl (which adds ``events.recipient_domain``)."""
    ttl = f"TTL hour + INTERVAL {int(retention_days)} DAY"
    return [
        # the first version of this module (one wide table): replaced by the two below
        "DROP VIEW IF EXISTS bi_hourly_mv",
        "DROP TABLE IF EXISTS bi_hourly",
        f"""
        CREATE TABLE IF NOT EXISTS bi_tenant_hourly (
            hour DateTime('UTC'),
            tenant_id String,
{_COLUMNS_DDL}
        )
        ENGINE = SummingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (hour, tenant_id)
        {ttl}
        """,
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS bi_tenant_hourly_mv TO bi_tenant_hourly AS {_SELECT_TENANT}",
        f"""
        CREATE TABLE IF NOT EXISTS bi_dim_hourly (
            dim LowCardinality(String),
            hour DateTime('UTC'),
            tenant_id String,
            key String,
{_COLUMNS_DDL}
        )
        ENGINE = SummingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (dim, hour, tenant_id, key)
        {ttl}
        """,
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS bi_dim_hourly_mv TO bi_dim_hourly AS {_SELECT_DIMS}",
        # the first distinct-message tables (uniqExact states, too slow): replaced by the two below
        "DROP VIEW IF EXISTS bi_tenant_uniq_hourly_mv", "DROP VIEW IF EXISTS bi_dim_uniq_hourly_mv",
        "DROP TABLE IF EXISTS bi_tenant_uniq_hourly", "DROP TABLE IF EXISTS bi_dim_uniq_hourly",
        # distinct messages (docs/bi.md, "Distinct messages"): the same keys, distinct-count states
        f"""
        CREATE TABLE IF NOT EXISTS bi_tenant_distinct_hourly (
            hour DateTime('UTC'),
            tenant_id String,
{_STATES_DDL}
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (tenant_id, hour)
        {ttl}
        """,
        "CREATE MATERIALIZED VIEW IF NOT EXISTS bi_tenant_distinct_hourly_mv TO bi_tenant_distinct_hourly AS "
        f"{_SELECT_TENANT_DISTINCT}",
        f"""
        CREATE TABLE IF NOT EXISTS bi_dim_distinct_hourly (
            dim LowCardinality(String),
            hour DateTime('UTC'),
            tenant_id String,
            key String,
{_STATES_DDL}
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (dim, tenant_id, hour, key)
        {ttl}
        """,
        "CREATE MATERIALIZED VIEW IF NOT EXISTS bi_dim_distinct_hourly_mv TO bi_dim_distinct_hourly AS "
        f"{_SELECT_DIMS_DISTINCT}",
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


DROP = ["DROP VIEW IF EXISTS bi_tenant_hourly_mv", "DROP VIEW IF EXISTS bi_dim_hourly_mv",
        "DROP VIEW IF EXISTS bi_tenant_distinct_hourly_mv", "DROP VIEW IF EXISTS bi_dim_distinct_hourly_mv",
        "DROP TABLE IF EXISTS bi_tenant_hourly", "DROP TABLE IF EXISTS bi_dim_hourly",
        "DROP TABLE IF EXISTS bi_tenant_distinct_hourly", "DROP TABLE IF EXISTS bi_dim_distinct_hourly",
        "DROP TABLE IF EXISTS bi_backfill"]


# backfill version -> the tables it fills (each recorded apart: a store that already had the
# summing tables gets only the distinct ones, and no event is summed twice)
_BACKFILLS: dict[int, tuple[tuple[str, str], ...]] = {
    BACKFILL_VERSION: (("bi_tenant_hourly", _SELECT_TENANT), ("bi_dim_hourly", _SELECT_DIMS)),
    DISTINCT_BACKFILL_VERSION: (("bi_tenant_distinct_hourly", _SELECT_TENANT_DISTINCT),
                                ("bi_dim_distinct_hourly", _SELECT_DIMS_DISTINCT)),
}


def backfill(client: Any) -> bool:
    """Fill the BI tables from the events loaded before they existed, once per table set
    (recorded in ``bi_backfill``). Returns whether any ran. ``client``: a clickhouse-connect
    client (the caller holds the store's lock, and the ingest has not started)."""
    ran = False
    for version, tables in _BACKFILLS.items():
        done = client.query("SELECT count() FROM bi_backfill WHERE version = {v:UInt32}",
                            parameters={"v": version}).result_rows[0][0]
        if int(done):
            continue
        rows = int(client.query("SELECT count() FROM events").result_rows[0][0])
        if rows:
            for table, select in tables:
                client.command(f"INSERT INTO {table} {select}")
        client.insert("bi_backfill", [[version, rows]], column_names=["version", "rows"])
        ran = True
    return ran


@dataclass(frozen=True)
class Query:
    from_ts: int
    to_ts: int
    bucket: str = "hour"
    group_by: str | None = None
    top: int = DEFAULT_TOP
    tenant_id: str | None = None
    distinct: bool = True  # the distinct-message figures too (False: the event counts only, cheaper)


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


def _window(q: Query) -> tuple[str, dict[str, Any]]:
    where = ["hour >= toStartOfHour(toDateTime({f:Int64}, 'UTC'))", "hour <= toDateTime({t:Int64}, 'UTC')"]
    params: dict[str, Any] = {"f": int(q.from_ts), "t": int(q.to_ts)}
    if q.tenant_id is not None:
        where.append("tenant_id = {tenant:String}")
        params["tenant"] = q.tenant_id
    return " AND ".join(where), params


_MERGES = ", ".join(f"{DISTINCT_FUNCTION}Merge({c}) AS {c}" for c in DISTINCT_COLUMNS)


def build(q: Query) -> dict[str, tuple[str, dict[str, Any]]]:
    """The SQL of the parts of an answer: ``totals``, ``series`` and (with group_by) ``groups``
    (event counts), and with ``q.distinct`` ``distinct`` (the distinct figures of every bucket and
    of the whole window in one pass: ``GROUPING SETS``, the window's row has ``total`` = 1; the
    distinct groups need the top keys first: :func:`build_distinct_groups`), each as (sql,
    parameters). Values are bound parameters; the only interpolated names come from the fixed
    tables above. Totals, series and per-tenant groups read ``bi_tenant_hourly`` (one row per
    tenant and hour); the other groups ``bi_dim_hourly``; the distinct parts their
    ``_distinct_`` twins."""
    cond, params = _window(q)
    sums = ", ".join(f"sum({c}) AS {c}" for c in SUMMED)
    bucket = "hour" if q.bucket == "hour" else "toStartOfDay(hour)"
    out = {
        "totals": (f"SELECT {sums} FROM bi_tenant_hourly WHERE {cond}", dict(params)),
        "series": (f"SELECT toUnixTimestamp({bucket}) AS b, {sums} FROM bi_tenant_hourly WHERE {cond} "
                   "GROUP BY b ORDER BY b", dict(params)),
    }
    limit = "GROUP BY g ORDER BY sent DESC, g LIMIT {top:UInt32}"
    if q.group_by == "tenant":
        out["groups"] = (f"SELECT tenant_id AS g, {sums} FROM bi_tenant_hourly WHERE {cond} {limit}",
                         {**params, "top": int(q.top)})
    elif q.group_by is not None:
        out["groups"] = (f"SELECT key AS g, {sums} FROM bi_dim_hourly WHERE dim = {{dim:String}} AND {cond} "
                         f"{limit}", {**params, "top": int(q.top), "dim": q.group_by})
    if q.distinct:
        out["distinct"] = (
            f"SELECT grouping(b) AS total, toUnixTimestamp({bucket}) AS b, {_MERGES} "
            f"FROM bi_tenant_distinct_hourly WHERE {cond} GROUP BY GROUPING SETS ((b), ()) ORDER BY total, b",
            dict(params))
    return out


def build_distinct_groups(q: Query, keys: list[str]) -> tuple[str, dict[str, Any]]:
    """The distinct figures of the groups already chosen (the top N by ``sent`` events): only
    their rows are merged."""
    cond, params = _window(q)
    params["keys"] = list(keys)
    if q.group_by == "tenant":
        return (f"SELECT tenant_id AS g, {_MERGES} FROM bi_tenant_distinct_hourly WHERE {cond} "
                "AND tenant_id IN {keys:Array(String)} GROUP BY g", params)
    params["dim"] = q.group_by
    return (f"SELECT key AS g, {_MERGES} FROM bi_dim_distinct_hourly WHERE dim = {{dim:String}} "
            f"AND {cond} AND key IN {{keys:Array(String)}} GROUP BY g", params)


def _counts(row: tuple[Any, ...] | list[Any]) -> dict[str, int]:
    raw = dict(zip(SUMMED, (int(v or 0) for v in row), strict=True))
    out = {f: raw.get(f, 0) for f in FIELDS}
    out["delivered"] = max(0, raw["sent"] - raw["bounced"])
    return out


def _distinct(row: tuple[Any, ...] | list[Any]) -> dict[str, int]:
    raw = dict(zip(DISTINCT_COLUMNS, (int(v or 0) for v in row), strict=True))
    out = {f: raw.get(f, 0) for f in DISTINCT_FIELDS}
    # as ``delivered``: sent - hard-bounced (a stored |sent or bounced| state for the exact
    # difference cost 40-80 % more per query: docs/bi.md)
    out["messages_delivered"] = max(0, raw["messages_sent"] - raw["messages_bounced"])
    return out


def empty_distinct() -> dict[str, int]:
    return {f: 0 for f in DISTINCT_FIELDS}


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

    def rows(part: str) -> list[Any]:
        return list(store._client.query(sql[part][0], parameters=sql[part][1]).result_rows)

    d_totals: list[Any] = []
    d_series: list[Any] = []
    d_groups: list[Any] = []
    d_rows: list[Any] = []
    with store._lock:
        totals, series = rows("totals"), rows("series")
        groups = rows("groups") if "groups" in sql else []
        if q.distinct:
            d_rows = rows("distinct")
            if groups:
                g_sql, g_params = build_distinct_groups(q, [str(r[0]) for r in groups])
                d_groups = list(store._client.query(g_sql, parameters=g_params).result_rows)

    def merged(counts: dict[str, int], distinct: dict[str, int] | None) -> dict[str, int]:
        return counts if distinct is None else {**counts, **distinct}

    d_totals = [r[2:] for r in d_rows if int(r[0]) == 1]
    d_series = [r[1:] for r in d_rows if int(r[0]) == 0]
    none = empty_distinct() if q.distinct else None
    by_bucket = {int(r[0]): _counts(r[1:]) for r in series}
    d_by_bucket = {int(r[0]): _distinct(r[1:]) for r in d_series}
    d_by_group = {str(r[0]): _distinct(r[1:]) for r in d_groups}
    return {
        "from_ts": q.from_ts, "to_ts": q.to_ts, "bucket": q.bucket, "group_by": q.group_by,
        "distinct": q.distinct,
        "totals": merged(_counts(totals[0]) if totals else empty_counts(),
                         (_distinct(d_totals[0]) if d_totals else none) if q.distinct else None),
        "series": [{"ts": b, **merged(by_bucket.get(b, empty_counts()),
                                      d_by_bucket.get(b, none) if q.distinct else None)}
                   for b in bucket_starts(q)],
        "groups": [{"key": str(r[0]), **merged(_counts(r[1:]),
                                               d_by_group.get(str(r[0]), none) if q.distinct else None)}
                   for r in groups],
    }
