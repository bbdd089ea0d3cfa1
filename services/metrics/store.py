"""ClickHouse schema and queries of the metrics service (clickhouse-connect only).

Every table is a projection of the ``postbus.events`` topic, so none of them is precious: dropping
them and re-reading the topic from offset 0 rebuilds the same answers (that is what replay does).

Idempotency: a crash between "insert rows" and "store offsets" re-inserts a batch on restart, so a
row may exist twice until ClickHouse merges it away. Every query is written to be exact anyway:
counts are ``uniqExact`` over ids (duplicates cannot change a distinct count), and the offsets
table keeps the max offset per partition.

Blocking calls: clickhouse-connect is synchronous and chdb runs in-process, so ``Store`` serialises
every call with one lock (one chdb handle must not be used by two threads at once; an HTTP client
with a session id must not run two queries at once either). ``AsyncStore`` runs them off the event
loop with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from services.metrics import analytics, bi
from services.metrics import messages as msgs

log = logging.getLogger("postbus.metrics.store")

# event types that the query API reports; later schema issues add bounce/complaint/open/click
OUTCOME_FIELDS: dict[str, str] = {
    "sent": "sent",
    "error": "error",
    "deferred": "deferred",
    "rejected": "rejected",
    "bounce": "bounced",
    "complaint": "complaints",
    "open": "opens",
    "click": "clicks",
}
MAX_WINDOW_HOURS = 8760
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([hd])$")

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "type", "tenant_id", "account_id", "message_id", "pk", "ts", "accepted_ts", "attempt",
    "smtp_code", "error", "deferred_reason", "deferred_until", "batch_code", "sender_domain",
    "recipients", "kafka_partition", "kafka_offset", "bounce_type",
    "recipient_domain",  # analytics: the mailbox provider (column added by analytics.ddl)
)


def _ddl(retention_days: int) -> list[str]:
    return [
        # Ordered for "one tenant, one time window": the primary index prunes by tenant then hour.
        # ReplacingMergeTree collapses a re-loaded event (same key) at merge time; queries never
        # rely on the merge having happened.
        f"""
        CREATE TABLE IF NOT EXISTS events (
            event_id String,
            type LowCardinality(String),
            tenant_id String,
            account_id String,
            message_id String,
            pk String,
            ts DateTime64(3, 'UTC'),
            accepted_ts Nullable(DateTime64(3, 'UTC')),
            attempt UInt32,
            smtp_code Nullable(Int32),
            error String,
            deferred_reason String,
            deferred_until Nullable(DateTime64(3, 'UTC')),
            batch_code String,
            sender_domain String,
            recipients UInt32,
            kafka_partition UInt32,
            kafka_offset UInt64,
            INDEX idx_message_id message_id TYPE bloom_filter(0.01) GRANULARITY 4
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(ts)
        ORDER BY (tenant_id, toStartOfHour(ts), type, event_id)
        TTL toDateTime(ts) + INTERVAL {int(retention_days)} DAY
        """,
        # inbound bounces: hard | soft (only hard bounces count as "bounced"); added to older tables
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS bounce_type LowCardinality(String) DEFAULT ''",
        # "was this id already sent?" is a point lookup by (tenant, id); the events order key cannot
        # answer it without scanning the tenant, so a view keeps a narrow copy of the sent events.
        # No TTL: the already-sent guarantee must not expire with the analytics retention.
        """
        CREATE TABLE IF NOT EXISTS sent_ids (
            tenant_id String,
            message_id String,
            ts DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree
        ORDER BY (tenant_id, message_id)
        """,
        """
        CREATE MATERIALIZED VIEW IF NOT EXISTS sent_ids_mv TO sent_ids AS
        SELECT tenant_id, message_id, ts FROM events WHERE type = 'sent'
        """,
        # next offset to read per (topic, partition); the version column keeps the highest one
        """
        CREATE TABLE IF NOT EXISTS ingest_offsets (
            topic String,
            partition UInt32,
            next_offset UInt64,
            updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree(next_offset)
        ORDER BY (topic, partition)
        """,
        *msgs.DDL,
        *analytics.ddl(retention_days),
        *bi.ddl(retention_days),  # BI aggregates (bi.py): after analytics adds recipient_domain
    ]


DROP = [
    *bi.DROP,
    *analytics.DROP,
    "DROP VIEW IF EXISTS sent_ids_mv",
    "DROP TABLE IF EXISTS events",
    "DROP TABLE IF EXISTS sent_ids",
    "DROP TABLE IF EXISTS ingest_offsets",
    *msgs.DROP,
]


def parse_window(window: str) -> int:
    """'24h' / '7d' -> hours (1h..8760h). Raises ValueError with a message fit for a client."""
    m = _WINDOW.match(window.strip()) if isinstance(window, str) else None
    if not m:
        raise ValueError(f"window must look like 24h or 7d (got {window!r})")
    hours = int(m[1]) * (24 if m[2] == "d" else 1)
    if hours > MAX_WINDOW_HOURS:
        raise ValueError(f"window must be at most {MAX_WINDOW_HOURS}h (got {window!r})")
    return hours


@dataclass(frozen=True)
class Counts:
    values: dict[str, int]
    # sent and never hard-bounced since (None: not computed, e.g. for grouped analytics: = sent)
    delivered: int | None = None
    # messages held right now by a rate limit or destination throttle (None: not computed)
    throttled: int | None = None

    def as_dict(self) -> dict[str, int]:
        out = {field: 0 for field in OUTCOME_FIELDS.values()}
        for type_, n in self.values.items():
            if type_ in OUTCOME_FIELDS:
                out[OUTCOME_FIELDS[type_]] = n
        out["delivered"] = out["sent"] if self.delivered is None else self.delivered
        if self.throttled is not None:
            out["throttled"] = self.throttled
        return out


def event_row(ev: dict[str, Any], partition: int = 0, offset: int = 0) -> list[Any]:
    """A decoded DeliveryEvent -> one ``events`` row (order of EVENT_COLUMNS)."""
    return [
        ev["event_id"], ev["type"], ev["tenant_id"], ev.get("account_id") or "", ev["message_id"],
        ev.get("pk") or "", int(ev["ts"]), ev.get("accepted_ts"), int(ev.get("attempt") or 0),
        ev.get("smtp_code"), ev.get("error") or "", ev.get("deferred_reason") or "",
        ev.get("deferred_until"), ev.get("batch_code") or "", ev.get("sender_domain") or "",
        max(0, int(ev.get("recipients") or 0)), partition, offset, ev.get("bounce_type") or "",
        analytics.recipient_domain(ev),
    ]


class Store:
    """Synchronous, thread-safe access to the metrics tables."""

    def __init__(self, dsn: str, retention_days: int = 400, client: Client | None = None) -> None:
        self.dsn = dsn
        self.retention_days = retention_days
        self._lock = threading.RLock()
        self._client: Client = client or clickhouse_connect.get_client(dsn=dsn)

    # -- lifecycle -------------------------------------------------------------------------------
    def create(self) -> None:
        with self._lock:
            for stmt in _ddl(self.retention_days):
                self._client.command(stmt)
            if bi.backfill(self._client):  # once: the events loaded before bi_hourly existed
                log.info("bi_hourly backfilled from events")

    def reset(self) -> None:
        """Drop and recreate every table: the next ingest starts from offset 0."""
        with self._lock:
            for stmt in DROP:
                self._client.command(stmt)
            self.create()
        log.info("metrics tables dropped and recreated")

    def close(self) -> None:
        with self._lock:
            self._client.close()

    # -- ingest ----------------------------------------------------------------------------------
    def insert_events(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            self._client.insert("events", rows, column_names=list(EVENT_COLUMNS))

    def insert_rows(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        with self._lock:
            self._client.insert(table, rows, column_names=list(columns))

    def store_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        rows = [[topic, p, o] for p, o in sorted(offsets.items())]
        with self._lock:
            self._client.insert("ingest_offsets", rows, column_names=["topic", "partition", "next_offset"])

    def write_batch(self, events: Sequence[Sequence[Any]],
                    tables: Sequence[tuple[str, Sequence[Sequence[Any]], Sequence[str]]],
                    offsets: dict[tuple[str, int], int]) -> None:
        """One ingest batch: the events, the other tables' rows, then the offsets they reach (one
        insert each, in this order; a crash before the offsets re-loads the batch, which every
        query absorbs)."""
        with self._lock:
            if events:
                self._client.insert("events", events, column_names=list(EVENT_COLUMNS))
            for table, rows, columns in tables:
                if rows:
                    self._client.insert(table, rows, column_names=list(columns))
            if offsets:
                self._client.insert("ingest_offsets", [[t, p, o] for (t, p), o in sorted(offsets.items())],
                                    column_names=["topic", "partition", "next_offset"])

    def load_offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            res = self._client.query(
                "SELECT partition, max(next_offset) FROM ingest_offsets WHERE topic = {t:String} "
                "GROUP BY partition",
                parameters={"t": topic},
            )
        return {int(p): int(o) for p, o in res.result_rows}

    def row_count(self) -> int:
        """Distinct events loaded (exact even before duplicate rows are merged)."""
        with self._lock:
            return int(self._client.query("SELECT uniqExact(event_id) FROM events").result_rows[0][0])

    # -- queries ---------------------------------------------------------------------------------
    def tenant_counts(self, tenant_id: str, from_ms: int, to_ms: int) -> Counts:
        """Distinct messages per event type for one tenant with from_ms <= ts <= to_ms."""
        with self._lock:
            res = self._client.query(
                """
                SELECT type, uniqExact(message_id)
                FROM events
                WHERE tenant_id = {tenant:String}
                  AND ts >= fromUnixTimestamp64Milli({f:Int64}, 'UTC')
                  AND ts <= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
                  AND NOT (type = 'bounce' AND bounce_type = 'soft')  -- bounced = hard bounces
                GROUP BY type
                """,
                parameters={"tenant": tenant_id, "f": int(from_ms), "t": int(to_ms)},
            )
            # delivered: sent in the window and not hard-bounced later (whenever the bounce came)
            delivered = self._client.query(
                """
                SELECT uniqExactIf(message_id, type = 'sent' AND ts >= fromUnixTimestamp64Milli({f:Int64}, 'UTC')
                                   AND ts <= fromUnixTimestamp64Milli({t:Int64}, 'UTC'))
                FROM events
                WHERE tenant_id = {tenant:String}
                  AND message_id NOT IN (SELECT message_id FROM events WHERE tenant_id = {tenant:String}
                                         AND type = 'bounce' AND bounce_type != 'soft')
                """,
                parameters={"tenant": tenant_id, "f": int(from_ms), "t": int(to_ms)},
            ).result_rows[0][0]
            # held by a limit right now: the message's newest event is such a deferral, due later
            throttled = self._client.query(
                """
                SELECT count() FROM (
                    SELECT message_id, argMax(type, ts) AS last, argMax(deferred_reason, ts) AS reason,
                           argMax(deferred_until, ts) AS until
                    FROM events
                    WHERE tenant_id = {tenant:String} AND type IN ('deferred', 'sent', 'error', 'deleted')
                      AND ts >= now64(3) - INTERVAL 2 DAY
                    GROUP BY message_id
                )
                WHERE last = 'deferred' AND reason IN ('rate_limit', 'destination_throttle') AND until > now64(3)
                """,
                parameters={"tenant": tenant_id},
            ).result_rows[0][0]
        return Counts({str(t): int(n) for t, n in res.result_rows}, delivered=int(delivered),
                      throttled=int(throttled))

    def counters(self) -> dict[str, Any]:
        """All-time delivery counters per (tenant, account) and the pending-message count, for the
        gmp_* Prometheus series the API exposes (computed here so any number of senders agree)."""
        with self._lock:
            per_account = self._client.query(
                """
                SELECT tenant_id, account_id,
                       uniqExactIf(message_id, type = 'sent'),
                       uniqExactIf(message_id, type = 'error'),
                       uniqExactIf(event_id, type = 'deferred'),
                       uniqExactIf(event_id, (type = 'deferred' AND deferred_reason = 'rate_limit')
                                   OR (type IN ('error', 'rejected') AND startsWith(error, 'rate_limit_exceeded')))
                FROM events
                WHERE account_id != ''
                GROUP BY tenant_id, account_id
                """
            ).result_rows
            pending = self._client.query(
                """
                SELECT count() FROM (SELECT DISTINCT tenant_id, id FROM messages) AS m
                WHERE (tenant_id, id) NOT IN (
                        SELECT tenant_id, message_id FROM events
                        WHERE type IN ('sent', 'error', 'rejected', 'deleted'))
                  AND (tenant_id, id) NOT IN (SELECT tenant_id, id FROM message_marks)
                  AND tenant_id NOT IN (SELECT tenant_id FROM message_marks WHERE id = '')
                """
            ).result_rows[0][0]
        return {
            "accounts": [
                {"tenant_id": t, "account_id": a, "sent": int(s), "errors": int(e), "deferred": int(d),
                 "rate_limited": int(r)}
                for t, a, s, e, d, r in per_account
            ],
            "pending": int(pending),
        }

    def sent_ids(self, tenant_id: str, ids: Iterable[str]) -> list[str]:
        """The ids among ``ids`` that have a ``sent`` event for this tenant (input order kept)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        with self._lock:
            res = self._client.query(
                "SELECT DISTINCT message_id FROM sent_ids "
                "WHERE tenant_id = {tenant:String} AND message_id IN {ids:Array(String)}",
                parameters={"tenant": tenant_id, "ids": wanted},
            )
        found = {r[0] for r in res.result_rows}
        return [i for i in wanted if i in found]

    def message_events(self, tenant_id: str, message_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """History of one message (deduplicated, oldest first)."""
        with self._lock:
            res = self._client.query(
                """
                SELECT event_id, any(type), toUnixTimestamp64Milli(any(ts)), any(attempt),
                       any(smtp_code), any(error), any(deferred_reason),
                       toUnixTimestamp64Milli(any(deferred_until)), any(account_id)
                FROM events
                WHERE tenant_id = {tenant:String} AND message_id = {mid:String}
                GROUP BY event_id
                ORDER BY 3, 1
                LIMIT {lim:UInt32}
                """,
                parameters={"tenant": tenant_id, "mid": message_id, "lim": int(limit)},
            )
        keys = ("event_id", "type", "ts", "attempt", "smtp_code", "error", "deferred_reason",
                "deferred_until", "account_id")
        return [dict(zip(keys, row, strict=True)) for row in res.result_rows]


class AsyncStore:
    """The same operations, awaited from the event loop (each call runs in a worker thread)."""

    def __init__(self, store: Store) -> None:
        self.sync = store

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(partial(fn, *args, **kwargs))

    async def create(self) -> None:
        await self.run(self.sync.create)

    async def reset(self) -> None:
        await self.run(self.sync.reset)

    async def insert_events(self, rows: Sequence[Sequence[Any]]) -> None:
        await self.run(self.sync.insert_events, rows)

    async def insert_rows(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        await self.run(self.sync.insert_rows, table, rows, columns)

    async def list_messages(self, tenant_id: str, **kw: Any) -> dict[str, Any]:
        return await self.run(msgs.list_messages, self.sync, tenant_id, **kw)

    async def lookup(self, tenant_id: str, ids: list[str]) -> dict[str, list[str]]:
        return await self.run(msgs.lookup, self.sync, tenant_id, ids)

    async def cleanup_ids(self, tenant_id: str, older_than_seconds: float) -> list[str]:
        return await self.run(msgs.cleanup_ids, self.sync, tenant_id, older_than_seconds)

    async def write_batch(self, events: Sequence[Sequence[Any]],
                          tables: Sequence[tuple[str, Sequence[Sequence[Any]], Sequence[str]]],
                          offsets: dict[tuple[str, int], int]) -> None:
        await self.run(self.sync.write_batch, events, tables, offsets)

    async def store_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        await self.run(self.sync.store_offsets, topic, offsets)

    async def load_offsets(self, topic: str) -> dict[int, int]:
        return await self.run(self.sync.load_offsets, topic)

    async def row_count(self) -> int:
        return await self.run(self.sync.row_count)

    async def tenant_counts(self, tenant_id: str, from_ms: int, to_ms: int) -> Counts:
        return await self.run(self.sync.tenant_counts, tenant_id, from_ms, to_ms)

    async def counters(self) -> dict[str, Any]:
        return await self.run(self.sync.counters)  # type: ignore[no-any-return]

    async def sent_ids(self, tenant_id: str, ids: list[str]) -> list[str]:
        return await self.run(self.sync.sent_ids, tenant_id, ids)

    async def message_events(self, tenant_id: str, message_id: str) -> list[dict[str, Any]]:
        return await self.run(self.sync.message_events, tenant_id, message_id)

    async def close(self) -> None:
        await self.run(self.sync.close)
