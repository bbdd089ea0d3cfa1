"""Load N synthetic delivery events into the embedded ClickHouse engine and time the tenant
metrics queries (24h / 7d / 30d) the way the metrics service runs them.

    python bench/metrics_query.py [--events 1000000] [--path /tmp/postbus-bench-ch]

Shape: one large tenant holding ~half of the events, 199 small ones sharing the rest, 35 days of
history, ~3 events per message (deferred retries, then sent/error), and 5% of the batches loaded
twice to exercise the duplicate handling (exact counts before merges).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.metrics import analytics
from services.metrics.store import Store, event_row

DAY_MS = 86_400_000
SENDER_DOMAINS = [f"brand{i}.example" for i in range(20)]
RCPT_DOMAINS = ["gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "yahoo.com",
                "icloud.com", "libero.it", "corp.example", "uni.example"]


def synth(n: int, now_ms: int, seed: int = 7) -> list[list]:
    rnd = random.Random(seed)
    rows: list[list] = []
    msg = 0
    while len(rows) < n:
        msg += 1
        tenant = "t-big" if rnd.random() < 0.5 else f"t-{rnd.randrange(199):03d}"
        ts = now_ms - rnd.randrange(35 * DAY_MS)
        sender_domain, rcpt = rnd.choice(SENDER_DOMAINS), f"u{msg}@{rnd.choice(RCPT_DOMAINS)}"
        for attempt in range(1, rnd.choice((1, 1, 2, 3, 4)) + 1):
            final = rnd.random()
            type_ = "deferred" if attempt < 3 and final < 0.3 else ("error" if final < 0.05 else "sent")
            ev = {
                "event_id": f"ev-{msg}-{attempt}", "type": type_, "tenant_id": tenant,
                "account_id": "acc-1", "message_id": f"m-{msg}", "pk": f"pk-{msg}",
                "ts": ts + attempt * 60_000, "attempt": attempt, "recipients": 1,
                "sender_domain": sender_domain, "recipient": rcpt,
            }
            rows.append(event_row(ev, msg % 8, msg))
            if type_ != "deferred":
                break
    return rows[:n]


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    fn()  # warm
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--path", default="/tmp/postbus-bench-ch")
    args = ap.parse_args()
    shutil.rmtree(args.path, ignore_errors=True)
    store = Store(f"chdb://{args.path}")
    store.create()
    now = int(time.time() * 1000)
    rows = synth(args.events, now)
    t0 = time.perf_counter()
    batch = 5000
    dup_batches = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        store.insert_events(chunk)
        if (i // batch) % 20 == 0:  # 5% of the batches loaded twice
            store.insert_events(chunk)
            dup_batches += 1
    load_s = time.perf_counter() - t0
    print(f"loaded {len(rows):,} events (+{dup_batches} duplicate batches of {batch}) in {load_s:.1f}s "
          f"({len(rows) / load_s:,.0f} rows/s, batches of {batch})")
    t_rows, n = timed(store.row_count, 3)
    print(f"distinct events: {n:,}  (ingest-status row count: {t_rows:.1f} ms)")

    client = store._client
    sql_final = (
        "SELECT type, count(DISTINCT message_id) FROM events FINAL WHERE tenant_id={t:String} "
        "AND ts >= fromUnixTimestamp64Milli({f:Int64}, 'UTC') "
        "AND ts <= fromUnixTimestamp64Milli({n:Int64}, 'UTC') GROUP BY type"
    )
    for tenant in ("t-big", "t-007"):
        for label, hours in (("24h", 24), ("7d", 168), ("30d", 720)):
            frm = now - hours * 3_600_000
            ms, counts = timed(lambda t=tenant, f=frm: store.tenant_counts(t, f, now))
            ms_final, final = timed(lambda t=tenant, f=frm: dict(client.query(
                sql_final, parameters={"t": t, "f": f, "n": now}).result_rows))
            assert {k: v for k, v in counts.values.items()} == final, (counts, final)
            print(f"{tenant:6} {label:>3}: uniqExact {ms:7.1f} ms | FINAL {ms_final:7.1f} ms | {counts.as_dict()}")
    # the hourly aggregating view: totals (checked against the raw events), per domain, per provider
    for tenant in ("t-big", "t-007"):
        for label, hours in (("24h", 24), ("7d", 168), ("30d", 720)):
            start, _ = analytics.window_bounds(hours, now)
            # the view has no upper bound: the synthetic history runs a few minutes past "now"
            raw = store.tenant_counts(tenant, start, now + DAY_MS).values
            line = []
            for group in (None, "domain", "provider"):
                ms, (_, _, groups) = timed(lambda t=tenant, h=hours, g=group: analytics.grouped_counts(
                    store, t, h, g, now))
                if group is None:
                    assert groups.get("", {}) == raw, (groups, raw)
                line.append(f"{group or 'tenant'} {ms:6.1f} ms ({len(groups)} groups)")
            print(f"{tenant:6} {label:>3} MV: " + " | ".join(line))
    ids = [f"m-{i}" for i in range(1, 1001)]
    ms, sent = timed(lambda: store.sent_ids("t-big", ids))
    print(f"sent-ids lookup of 1000 ids: {ms:.1f} ms ({len(sent)} sent)")
    store.close()


if __name__ == "__main__":
    main()
