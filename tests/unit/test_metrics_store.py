"""The metrics store and internal API against the real embedded ClickHouse engine (chdb).

chdb hosts one engine path per process, so each test closes its client before the next one opens
another tmp_path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.metrics.app import MetricsSettings, create_app
from services.metrics.store import AsyncStore, Store, event_row, parse_window

HOUR = 3_600_000
NOW = (int(time.time() * 1000) // HOUR) * HOUR  # close to the real clock: the retention TTL is real


def ev(event_id: str, type_: str, message_id: str, ts: int, tenant: str = "t-a", **kw: Any) -> list[Any]:
    base = {"event_id": event_id, "type": type_, "tenant_id": tenant, "message_id": message_id, "ts": ts}
    return event_row({**base, **kw})


def counts(store: Store, tenant: str, hours: int, now: int = NOW) -> dict[str, int]:
    return store.tenant_counts(tenant, now - hours * HOUR, now).as_dict()


def sample() -> list[list[Any]]:
    return [
        # m1: deferred twice, then sent (1h ago)
        ev("e1", "deferred", "m1", NOW - 3 * HOUR, attempt=1, deferred_reason="451"),
        ev("e2", "deferred", "m1", NOW - 2 * HOUR, attempt=2, deferred_reason="451"),
        ev("e3", "sent", "m1", NOW - 1 * HOUR, attempt=3, smtp_code=250),
        # m2: sent 2 days ago; m3: error 10 days ago; m4: rejected 40 days ago
        ev("e4", "sent", "m2", NOW - 48 * HOUR),
        ev("e5", "error", "m3", NOW - 240 * HOUR, smtp_code=550, error="mailbox unknown"),
        ev("e6", "rejected", "m4", NOW - 960 * HOUR),
        # m5: deferred three times within the last day: one distinct deferred message
        ev("e7", "deferred", "m5", NOW - 5 * HOUR),
        ev("e8", "deferred", "m5", NOW - 4 * HOUR),
        ev("e9", "deferred", "m5", NOW - 30 * 60_000),
    ]


ZERO = {"bounced": 0, "complaints": 0, "opens": 0, "clicks": 0, "throttled": 0}


def test_windows_count_distinct_messages_per_outcome(store: Store) -> None:
    store.insert_events(sample())
    assert counts(store, "t-a", 24) == {
        "sent": 1, "error": 0, "deferred": 2, "rejected": 0, "delivered": 1, **ZERO,
    }
    assert counts(store, "t-a", 7 * 24) == {
        "sent": 2, "error": 0, "deferred": 2, "rejected": 0, "delivered": 2, **ZERO,
    }
    assert counts(store, "t-a", 30 * 24) == {
        "sent": 2, "error": 1, "deferred": 2, "rejected": 0, "delivered": 2, **ZERO,
    }
    assert counts(store, "t-a", 8760)["rejected"] == 1


def test_window_bounds_are_inclusive_and_future_excluded(store: Store) -> None:
    store.insert_events([
        ev("edge", "sent", "m-edge", NOW - 24 * HOUR),
        ev("just-out", "sent", "m-out", NOW - 24 * HOUR - 1),
        ev("future", "sent", "m-future", NOW + 1),
    ])
    assert counts(store, "t-a", 24)["sent"] == 1


def test_double_insert_never_counts_twice(store: Store) -> None:
    rows = sample()
    store.insert_events(rows)
    store.insert_events(rows)  # a batch re-loaded after a crash before its offsets were stored
    store.insert_events(rows[:3])
    assert counts(store, "t-a", 30 * 24) == {
        "sent": 2, "error": 1, "deferred": 2, "rejected": 0, "delivered": 2, **ZERO,
    }
    assert store.row_count() == len(rows)
    assert store.sent_ids("t-a", ["m1", "m2"]) == ["m1", "m2"]
    history = store.message_events("t-a", "m1")
    assert [h["event_id"] for h in history] == ["e1", "e2", "e3"]
    assert [h["type"] for h in history] == ["deferred", "deferred", "sent"]


def test_tenant_scoping(store: Store) -> None:
    store.insert_events(sample())
    store.insert_events([
        ev("b1", "sent", "m1", NOW - HOUR, tenant="t-b"),
        ev("b2", "sent", "mb", NOW - HOUR, tenant="t-b"),
        ev("b3", "error", "mc", NOW - HOUR, tenant="t-b"),
        ev("b4", "deferred", "m9", NOW - HOUR, tenant="t-b"),
    ])
    assert counts(store, "t-a", 24) == {
        "sent": 1, "error": 0, "deferred": 2, "rejected": 0, "delivered": 1, **ZERO,
    }
    assert counts(store, "t-b", 24) == {
        "sent": 2, "error": 1, "deferred": 1, "rejected": 0, "delivered": 2, **ZERO,
    }
    assert counts(store, "t-c", 24) == {
        "sent": 0, "error": 0, "deferred": 0, "rejected": 0, "delivered": 0, **ZERO,
    }
    # sent ids are per tenant too: "mb" was sent by t-b only, "m9" only deferred
    assert store.sent_ids("t-a", ["mb", "m1", "m9", "m3"]) == ["m1"]
    assert store.sent_ids("t-b", ["mb", "m1", "m9", "mc"]) == ["mb", "m1"]
    assert store.sent_ids("t-a", []) == []
    assert store.message_events("t-b", "m3") == []


def test_later_event_types_map_to_their_fields(store: Store) -> None:
    store.insert_events([
        ev("x1", "bounce", "m1", NOW - HOUR), ev("x2", "complaint", "m1", NOW - HOUR),
        ev("x3", "open", "m1", NOW - HOUR), ev("x4", "open", "m2", NOW - HOUR),
        ev("x5", "click", "m2", NOW - HOUR), ev("x6", "pec_acceptance", "m2", NOW - HOUR),
    ])
    c = counts(store, "t-a", 24)
    assert (c["bounced"], c["complaints"], c["opens"], c["clicks"], c["sent"]) == (1, 1, 2, 1, 0)


def test_retention_ttl_drops_old_events(tmp_path: Path) -> None:
    s = Store(f"chdb://{tmp_path / 'ch'}", retention_days=30)
    try:
        s.create()
        s.insert_events([ev("old", "sent", "m-old", NOW - 31 * 24 * HOUR), ev("new", "sent", "m-new", NOW - HOUR)])
        s._client.command("OPTIMIZE TABLE events FINAL")  # TTL is applied at merge time at the latest
        assert counts(s, "t-a", 8760)["sent"] == 1
        assert s.row_count() == 1
    finally:
        s.close()


@pytest.mark.parametrize(("window", "hours"), [("1h", 1), ("24h", 24), ("7d", 168), ("30d", 720),
                                                ("8760h", 8760), ("365d", 8760)])
def test_parse_window(window: str, hours: int) -> None:
    assert parse_window(window) == hours


@pytest.mark.parametrize("window", ["", "0h", "24", "h", "24m", "-1d", "1.5d", "8761h", "366d", "24 h", "1w"])
def test_parse_window_rejects(window: str) -> None:
    with pytest.raises(ValueError, match="window"):
        parse_window(window)


def test_offsets_keep_the_highest_per_partition(store: Store) -> None:
    assert store.load_offsets("postbus.events") == {}
    store.store_offsets("postbus.events", {0: 10, 1: 5})
    store.store_offsets("postbus.events", {0: 25})
    store.store_offsets("postbus.events", {0: 20})  # a late duplicate write never moves it back
    store.store_offsets("other", {0: 99})
    assert store.load_offsets("postbus.events") == {0: 25, 1: 5}


def test_replay_reset_rebuilds_identical_answers(store: Store) -> None:
    rows = [*sample(), ev("b1", "sent", "mb", NOW - HOUR, tenant="t-b")]
    store.insert_events(rows)
    store.store_offsets("postbus.events", {0: len(rows)})
    before = {(t, h): counts(store, t, h) for t in ("t-a", "t-b") for h in (24, 168, 720)}
    sent_before = store.sent_ids("t-a", ["m1", "m2", "m3"])

    store.reset()
    assert store.load_offsets("postbus.events") == {}  # ingest restarts from offset 0
    assert store.row_count() == 0
    assert counts(store, "t-a", 720)["sent"] == 0
    assert store.sent_ids("t-a", ["m1"]) == []

    for i in range(0, len(rows), 3):  # re-read in different batch sizes, with a duplicate batch
        store.insert_events(rows[i : i + 3])
    store.insert_events(rows[:4])
    after = {(t, h): counts(store, t, h) for t in ("t-a", "t-b") for h in (24, 168, 720)}
    assert after == before
    assert before[("t-a", 720)]["sent"] == 2
    assert store.sent_ids("t-a", ["m1", "m2", "m3"]) == sent_before == ["m1", "m2"]


def test_reopen_keeps_data(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'ch'}"
    s = Store(dsn)
    s.create()
    s.insert_events(sample())
    s.store_offsets("postbus.events", {3: 9})
    s.close()
    s = Store(dsn)
    try:
        s.create()  # IF NOT EXISTS: a restart keeps the tables
        assert s.load_offsets("postbus.events") == {3: 9}
        assert counts(s, "t-a", 24)["deferred"] == 2
    finally:
        s.close()


async def test_concurrent_calls_from_threads_are_safe(store: Store) -> None:
    """Inserts and queries from several worker threads at once share one chdb handle safely."""
    astore = AsyncStore(store)
    batches = [[ev(f"c{b}-{i}", "sent", f"m{b}-{i}", NOW - HOUR) for i in range(50)] for b in range(8)]
    await asyncio.gather(*(astore.insert_events(b) for b in batches),
                         *(astore.tenant_counts("t-a", NOW - 24 * HOUR, NOW) for _ in range(8)))
    results = await asyncio.gather(*(astore.tenant_counts("t-a", NOW - 24 * HOUR, NOW) for _ in range(16)),
                                   astore.sent_ids("t-a", ["m0-0", "m7-49", "nope"]), astore.row_count())
    assert all(r.as_dict()["sent"] == 400 for r in results[:16])
    assert results[16] == ["m0-0", "m7-49"]
    assert results[17] == 400


# -- internal HTTP API (query side; ingest is tested with a broker) --------------------------------

@pytest.fixture
def api(store: Store) -> Iterator[tuple[TestClient, Store]]:
    token = "unit-internal-token"
    settings = MetricsSettings(metrics_ingest=False, kafka_bootstrap="127.0.0.1:1", internal_token=token)
    with TestClient(create_app(settings, store=store), headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, store


def test_api_tenant_metrics(api: tuple[TestClient, Store]) -> None:
    client, store = api
    now = int(time.time() * 1000)
    store.insert_events([
        ev("a1", "deferred", "m1", now - 2 * HOUR), ev("a2", "deferred", "m1", now - HOUR),
        ev("a3", "sent", "m1", now - 60_000), ev("a4", "sent", "m2", now - 3 * 24 * HOUR),
        ev("b1", "sent", "m3", now - 60_000, tenant="t-b"),
    ])
    r = client.get("/internal/tenants/t-a/metrics", params={"window": "24h"})
    assert r.status_code == 200
    body = r.json()
    assert body["window"] == "24h"
    assert body["to_ts"] - body["from_ts"] == 24 * HOUR
    assert abs(body["to_ts"] - now) < 60_000
    assert {k: v for k, v in body.items() if k not in ("window", "from_ts", "to_ts")} == {
        "sent": 1, "error": 0, "deferred": 1, "rejected": 0, "delivered": 1, **ZERO,
    }
    assert client.get("/internal/tenants/t-a/metrics?window=7d").json()["sent"] == 2
    assert client.get("/internal/tenants/t-a/metrics").json()["window"] == "24h"  # default


@pytest.mark.parametrize("window", ["abc", "0h", "8761h", "24m"])
def test_api_window_validation(api: tuple[TestClient, Store], window: str) -> None:
    client, _ = api
    r = client.get("/internal/tenants/t-a/metrics", params={"window": window})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert "window" in r.json()["error"]["message"]


def test_api_sent_ids(api: tuple[TestClient, Store]) -> None:
    client, store = api
    store.insert_events([
        ev("a1", "sent", "m1", NOW), ev("a2", "deferred", "m2", NOW),
        ev("b1", "sent", "m3", NOW, tenant="t-b"),
    ])
    r = client.post("/internal/sent-ids", json={"tenant_id": "t-a", "ids": ["m3", "m2", "m1", "m1"]})
    assert r.status_code == 200
    assert r.json() == {"sent": ["m1"]}
    too_many = client.post("/internal/sent-ids", json={"tenant_id": "t-a", "ids": [str(i) for i in range(1001)]})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["code"] == "VALIDATION_ERROR"
    missing = client.post("/internal/sent-ids", json={"ids": ["m1"]})
    assert missing.status_code == 422
    assert "tenant_id" in missing.json()["error"]["message"]


def test_api_status_replay_health(api: tuple[TestClient, Store]) -> None:
    client, store = api
    store.insert_events(sample())
    store.store_offsets("postbus.events", {0: 4, 1: 5})
    status = client.get("/internal/ingest-status").json()
    assert status["partitions"] == {"0": 4, "1": 5}
    assert status["rows"] == 9
    assert status["caught_up"] is False  # no consumer in this app
    r = client.post("/internal/replay")
    assert r.status_code == 202
    assert r.json() == {"ok": True}
    status = client.get("/internal/ingest-status").json()
    assert (status["partitions"], status["rows"]) == ({}, 0)
    assert client.get("/health").json()["ok"] is True
    text = client.get("/metrics").text
    assert "postbus_metrics_ingest_batch_seconds" in text
    assert "postbus_metrics_deadletters_total" in text
