"""BI aggregates (issue 13): load N synthetic delivery events into the metrics store (embedded
ClickHouse, the service's own schema; ``INSERT INTO events SELECT ... FROM numbers(N)``, so the
BI materialized views are fed exactly as by the ingest) and time 30-day queries through the
metrics service's internal route ``GET /internal/bi/metrics`` (the FastAPI app of
services/metrics/app.py, in process, with the internal credential; no TCP), each with the
distinct-message figures (``distinct=true``, the default) and without them (``distinct=false``:
the event counts only).

    python bench/bi_query.py [--events 10000000] [--path /tmp/postbus-bench-bi] [--repeat 5]

Shape (deterministic): ~half of the events are ``sent``, the rest deferrals, errors, rejections,
opens, clicks, hard/soft bounces and complaints, two events per message; 200 tenants (one holding
~30 % of the messages), one sending domain per tenant (three for the big one), 1-2 accounts, 10
recipient domains (8 providers), campaigns (``campaign-<id>-<n>`` ids, ~25 % of the messages) and
daily batch codes; 35 days of history ending now. 5 % of the events are loaded a second time
(a re-loaded batch, as after a crash between an insert and its offsets): the event counts include
the copies, the distinct figures must not (checked against ``uniqExact`` straight from ``events``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from services.metrics.app import MetricsSettings, create_app
from services.metrics.store import Store

TOKEN = "bench-internal-token-0123456789abcdef"
DAY_S = 86400
TYPES = "['sent','sent','sent','sent','sent','sent','sent','sent','sent','sent'," \
        "'deferred','deferred','error','rejected','open','open','open','click','bounce','complaint']"
RCPT = "['gmail.com','googlemail.com','outlook.com','hotmail.com','yahoo.com','icloud.com','libero.it'," \
       "'corp.example','uni.example','aol.com']"


def load_sql(n: int, now_ms: int, start: int = 0) -> str:
    """Events start..start+n (two per message: m = intDiv(number, 2))."""
    m = "intDiv(number, 2)"
    tenant = f"if(cityHash64({m}) % 10 < 3, 't-big', concat('t-', toString(cityHash64({m}, 7) % 199)))"
    ts_ms = f"toInt64({now_ms} - (cityHash64({m}, 3) % {35 * DAY_S * 1000}))"
    day = f"intDiv({ts_ms}, {DAY_S * 1000})"
    typ = f"arrayElement({TYPES}, (cityHash64(number, 5) % 20) + 1)"
    campaign = f"cityHash64({m}, 11) % 4 = 0"
    return f"""
    INSERT INTO events (event_id, type, tenant_id, account_id, message_id, pk, ts, attempt, error,
                        deferred_reason, batch_code, sender_domain, recipients, kafka_partition, kafka_offset,
                        bounce_type, recipient_domain)
    SELECT concat('ev-', toString(number)) AS event_id, {typ} AS type, {tenant} AS tenant_id,
           if(tenant_id = 't-big', concat('acct-', toString({m} % 2)), 'main') AS account_id,
           if({campaign}, concat('campaign-', toString({day} % 9 + 1 + (cityHash64(tenant_id) % 50) * 10), '-',
                                 toString({m})),
              concat('m-', toString({m}))) AS message_id,
           concat('pk-', toString({m})) AS pk,
           fromUnixTimestamp64Milli({ts_ms}, 'UTC') AS ts, 1 AS attempt, '' AS error, '' AS deferred_reason,
           if({campaign}, '', concat('batch-', toString({day}))) AS batch_code,
           if(tenant_id = 't-big', concat('brand', toString({m} % 3), '.example'),
              concat(tenant_id, '.example')) AS sender_domain,
           1 AS recipients, toUInt32(number % 8) AS kafka_partition, number AS kafka_offset,
           if(type = 'bounce', if(number % 3 = 0, 'soft', 'hard'), '') AS bounce_type,
           arrayElement({RCPT}, (cityHash64({m}, 9) % 10) + 1) AS recipient_domain
    FROM numbers({start}, {n})
    """


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--path", default="/tmp/postbus-bench-bi")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1_000_000, help="events per INSERT ... SELECT")
    ap.add_argument("--reuse", action="store_true", help="keep an already loaded store at --path")
    ap.add_argument("--merge", action="store_true",
                    help="OPTIMIZE ... FINAL the BI tables before timing (what background merges reach in time)")
    args = ap.parse_args()

    path = Path(args.path)
    if not args.reuse:
        shutil.rmtree(path, ignore_errors=True)
    store = Store(f"chdb://{path}")
    t0 = time.perf_counter()
    store.create()  # with --reuse on a store loaded before the BI tables existed: the one-time backfill
    print(f"store.create() (DDL + backfill when due): {time.perf_counter() - t0:.1f} s", flush=True)
    now_ms = int(time.time() * 1000)
    if not args.reuse:
        t0 = time.perf_counter()
        for start in range(0, args.events, args.chunk):
            store._client.command(load_sql(min(args.chunk, args.events - start), now_ms, start))
        # 5 % loaded twice (a re-delivered batch)
        store._client.command(load_sql(args.events // 20, now_ms, 0))
        load_s = time.perf_counter() - t0
        print(f"loaded {args.events + args.events // 20:,} event rows in {load_s:.1f} s "
              f"({(args.events + args.events // 20) / load_s:,.0f} rows/s, through the materialized view)")
    if args.merge:
        t0 = time.perf_counter()
        for table in ("bi_tenant_hourly", "bi_dim_hourly", "bi_tenant_distinct_hourly", "bi_dim_distinct_hourly"):
            store._client.command(f"OPTIMIZE TABLE {table} FINAL")
        print(f"OPTIMIZE ... FINAL of the BI tables: {time.perf_counter() - t0:.1f} s")
    events = store._client.query("SELECT count() FROM events").result_rows[0][0]
    print(f"events rows: {events:,}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for table in ("bi_tenant_hourly", "bi_dim_hourly", "bi_tenant_distinct_hourly", "bi_dim_distinct_hourly"):
        rows = store._client.query(f"SELECT count() FROM {table}").result_rows[0][0]
        parts = store._client.query(f"SELECT count() FROM system.parts WHERE table = '{table}' AND active"
                                    ).result_rows[0][0]
        size = store._client.query(f"SELECT sum(bytes_on_disk) FROM system.parts WHERE table = '{table}' AND active"
                                   ).result_rows[0][0]
        print(f"{table}: {rows:,} rows in {parts} parts, {int(size or 0) / 1e6:,.0f} MB", flush=True)

    os.environ["POSTBUS_INTERNAL_TOKEN"] = TOKEN
    settings = MetricsSettings(metrics_ingest=False, internal_token=TOKEN)
    app = create_app(settings, store=store)
    to_ts = now_ms // 1000
    from_ts = to_ts - 30 * DAY_S
    cases: list[tuple[str, dict[str, object]]] = [
        ("no group, hour buckets", {"bucket": "hour"}),
        ("no group, day buckets", {"bucket": "day"}),
        *[(f"group_by={g}, top 10, day buckets", {"bucket": "day", "group_by": g, "top": 10})
          for g in ("tenant", "domain", "provider", "campaign", "account")],
        ("group_by=provider, top 10, hour buckets", {"bucket": "hour", "group_by": "provider"}),
        ("tenant t-big only, group_by=domain, day", {"bucket": "day", "group_by": "domain", "tenant_id": "t-big"}),
        ("tenant t-007 only, group_by=provider, day", {"bucket": "day", "group_by": "provider",
                                                      "tenant_id": "t-7"}),
    ]
    # the views against the events themselves (the same hours, every event row counted)
    direct = store._client.query(
        "SELECT countIf(type = 'sent'), countIf(type = 'open'), countIf(type IN ('error', 'rejected')) FROM events "
        "WHERE ts >= toStartOfHour(toDateTime({f:Int64}, 'UTC')) AND ts < toStartOfHour(toDateTime({t:Int64}, 'UTC')) "
        "+ INTERVAL 1 HOUR", parameters={"f": from_ts, "t": to_ts}).result_rows[0]
    print(f"straight from events, same window: sent {direct[0]:,}, opened {direct[1]:,}, errors {direct[2]:,}")
    # distinct messages straight from events (the same hours): what the uniq views must answer
    udirect = store._client.query(
        "SELECT uniqExactIf(tenant_id, message_id, type = 'sent'), "
        "uniqExactIf(tenant_id, message_id, type = 'open'), uniqExactIf(tenant_id, message_id, type = 'click'), "
        "uniqExactIf(tenant_id, message_id, type = 'bounce' AND bounce_type != 'soft') "
        "FROM events WHERE ts >= toStartOfHour(toDateTime({f:Int64}, 'UTC')) "
        "AND ts < toStartOfHour(toDateTime({t:Int64}, 'UTC')) + INTERVAL 1 HOUR",
        parameters={"f": from_ts, "t": to_ts}).result_rows[0]
    # messages_delivered is defined as messages_sent - messages_bounced (docs/bi.md)
    expect_distinct = (int(udirect[0]), int(udirect[1]), int(udirect[2]), int(udirect[0]) - int(udirect[3]))
    print(f"straight from events, distinct: messages_sent {udirect[0]:,}, unique_opens {udirect[1]:,}, "
          f"unique_clicks {udirect[2]:,}, messages_delivered {expect_distinct[3]:,}")
    print(f"\n30-day window, median of {args.repeat} warm runs through GET /internal/bi/metrics; "
          f"load average {os.getloadavg()[0]:.1f}:\n")
    print("| query | distinct | median wall | min wall | median CPU | totals.sent | totals.messages_sent |")
    print("|---|---|---|---|---|---|---|")
    worst_error = 0.0
    with TestClient(app) as client:
        for name, params in cases:
            for distinct in ("false", "true"):
                q = {"from_ts": from_ts, "to_ts": to_ts, **params, "distinct": distinct}
                headers = {"Authorization": f"Bearer {TOKEN}"}
                r = client.get("/internal/bi/metrics", params=q, headers=headers)
                assert r.status_code == 200, r.text
                times, cpu = [], []
                for _ in range(args.repeat):
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = client.get("/internal/bi/metrics", params=q, headers=headers)
                    times.append((time.perf_counter() - t0) * 1000)
                    cpu.append((time.process_time() - c0) * 1000)  # chdb runs in this process: its threads too
                    assert r.status_code == 200, r.text
                totals = r.json()["totals"]
                if "tenant_id" not in params:
                    assert (totals["sent"], totals["opened"], totals["errors"]) == tuple(direct), (totals, direct)
                    if distinct == "true":
                        got = (totals["messages_sent"], totals["unique_opens"], totals["unique_clicks"],
                               totals["messages_delivered"])
                        # the estimate (bi.DISTINCT_FUNCTION) against the exact count: within 1 %
                        errors = [abs(g - e) / e for g, e in zip(got, expect_distinct, strict=True)]
                        assert max(errors) < 0.01, (got, expect_distinct)
                        worst_error = max(worst_error, *errors)
                print(f"| {name} | {'yes' if distinct == 'true' else 'no'} | {statistics.median(times):.0f} ms "
                      f"| {min(times):.0f} ms | {statistics.median(cpu):.0f} ms | {totals['sent']:,} "
                      f"| {totals.get('messages_sent', '-'):{',' if distinct == 'true' else ''}} |", flush=True)
    print(f"\nlargest relative error of a cross-tenant distinct total against uniqExact from events: "
          f"{worst_error:.3%}")
    store.close()


if __name__ == "__main__":
    main()
