"""BI aggregates (services/metrics/bi.py): SQL building, validation, and the answers of a real
embedded ClickHouse store (materialized views, distinct-message states, backfill, replay reset)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from services.metrics import bi
from services.metrics.store import Store, event_row

NOW_S = int(time.time()) // 3600 * 3600 + 1800  # the middle of the current hour
HOUR = 3600


def ev(eid: str, type_: str, mid: str, ts_s: int, tenant: str = "t1", **kw: Any) -> list[Any]:
    return event_row({"event_id": eid, "type": type_, "tenant_id": tenant, "message_id": mid, "ts": ts_s * 1000,
                      "sender_domain": kw.pop("domain", "a.test"), "recipient": kw.pop("rcpt", "x@gmail.com"),
                      "account_id": kw.pop("account", "main"), **kw})


def test_sql_binds_values_and_names_only_fixed_columns() -> None:
    q = bi.Query(1000, 2000, "day", "provider", 7, "t'; DROP TABLE events --")
    sql = bi.build(q)
    assert set(sql) == {"totals", "series", "groups", "distinct"}
    assert "uniqCombined64Merge(messages_sent)" in sql["distinct"][0]
    assert "FROM bi_tenant_distinct_hourly" in sql["distinct"][0] and "GROUPING SETS ((b), ())" in sql["distinct"][0]
    dg = bi.build_distinct_groups(q, ["google", "x'); DROP TABLE events --"])
    assert "DROP" not in dg[0] and dg[1]["keys"] == ["google", "x'); DROP TABLE events --"]
    assert "FROM bi_dim_distinct_hourly WHERE dim = {dim:String}" in dg[0] and "key IN {keys:Array(String)}" in dg[0]
    assert "tenant_id IN {keys:Array(String)}" in bi.build_distinct_groups(
        bi.Query(1000, 2000, group_by="tenant"), ["t1"])[0]
    assert set(bi.build(bi.Query(1000, 2000, distinct=False))) == {"totals", "series"}
    for text, params in (sql["totals"], sql["series"], sql["groups"], sql["distinct"], dg):
        assert "DROP" not in text and "t'" not in text  # the tenant id is a bound parameter
        assert params["tenant"] == "t'; DROP TABLE events --"
        assert params["f"] == 1000 and params["t"] == 2000
        assert "tenant_id = {tenant:String}" in text
    assert "GROUP BY g ORDER BY sent DESC, g LIMIT {top:UInt32}" in sql["groups"][0]
    assert sql["groups"][1]["top"] == 7
    assert "key AS g" in sql["groups"][0] and "FROM bi_dim_hourly WHERE dim = {dim:String}" in sql["groups"][0]
    assert sql["groups"][1]["dim"] == "provider"
    assert "toStartOfDay(hour)" in sql["series"][0]
    # no group_by: no groups query; hour buckets; no tenant filter
    sql = bi.build(bi.Query(1000, 2000))
    assert set(sql) == {"totals", "series", "distinct"}
    assert "toStartOfDay" not in sql["series"][0] and "tenant" not in sql["totals"][1]
    assert "tenant_id =" not in sql["totals"][0]
    tenant = bi.build(bi.Query(1000, 2000, group_by="tenant"))["groups"]
    assert "tenant_id AS g" in tenant[0] and "FROM bi_tenant_hourly" in tenant[0] and "dim" not in tenant[1]
    for dim in ("domain", "provider", "campaign", "account"):
        assert bi.build(bi.Query(1000, 2000, group_by=dim))["groups"][1]["dim"] == dim


@pytest.mark.parametrize(("q", "message"), [
    (bi.Query(1000, 2000, bucket="week"), "bucket must be hour or day"),
    (bi.Query(1000, 2000, group_by="country"), "group_by must be one of"),
    (bi.Query(1000, 2000, top=0), "top must be between 1 and 100"),
    (bi.Query(1000, 2000, top=101), "top must be between 1 and 100"),
    (bi.Query(2000, 2000), "to_ts must be after from_ts"),
    (bi.Query(-5, 2000), "epoch seconds"),
    (bi.Query(0, 401 * 86400), "at most 400 days"),
    (bi.Query(NOW_S + 3 * 86400, NOW_S + 4 * 86400), "in the future"),
    (bi.Query(1000, 2000, tenant_id=""), "tenant_id must not be empty"),
])
def test_validation(q: bi.Query, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bi.validate(q)


def test_bucket_starts_cover_the_window_without_gaps() -> None:
    assert bi.bucket_starts(bi.Query(3 * HOUR + 5, 5 * HOUR, "hour")) == [3 * HOUR, 4 * HOUR, 5 * HOUR]
    assert bi.bucket_starts(bi.Query(86400 + 7, 3 * 86400 - 1, "day")) == [86400, 2 * 86400]


def _load(store: Store) -> list[list[Any]]:
    rows = [
        ev("e1", "sent", "m1", NOW_S - HOUR),
        ev("e2", "sent", "m2", NOW_S - HOUR, rcpt="y@hotmail.com"),
        ev("e3", "bounce", "m2", NOW_S - HOUR, bounce_type="hard", rcpt="y@hotmail.com"),
        ev("e4", "bounce", "m1", NOW_S - HOUR, bounce_type="soft"),  # soft: not "bounced"
        ev("e5", "deferred", "m3", NOW_S - 2 * HOUR, domain="b.test"),
        ev("e6", "error", "m3", NOW_S - 2 * HOUR, domain="b.test"),
        ev("e7", "rejected", "m4", NOW_S - 2 * HOUR, domain="b.test"),
        ev("e8", "sent", "campaign-7-1", NOW_S - 3 * HOUR, tenant="t2", account="acc2", batch_code="campaign-7"),
        ev("e9", "open", "campaign-7-1", NOW_S - 3 * HOUR, tenant="t2", account=""),  # no batch code
        ev("e10", "click", "campaign-7-1", NOW_S - 3 * HOUR, tenant="t2", account=""),
        ev("e11", "complaint", "campaign-7-1", NOW_S - 3 * HOUR, tenant="t2", account=""),
        ev("e12", "sent", "m9", NOW_S - 40 * 86400, tenant="t2"),  # outside a 30-day window
    ]
    store.insert_events(rows)
    return rows


def test_answers_per_dimension(store: Store) -> None:
    _load(store)
    q = bi.Query(NOW_S - 30 * 86400, NOW_S, "hour")
    out = bi.run(store, q)
    assert out["totals"] == {"sent": 3, "delivered": 2, "bounced": 1, "complained": 1, "opened": 1, "clicked": 1,
                             "deferred": 1, "errors": 2,
                             "messages_sent": 3, "messages_delivered": 2, "messages_bounced": 1,
                             "messages_complained": 1, "unique_opens": 1, "unique_clicks": 1}
    assert out["groups"] == []
    assert len(out["series"]) == 30 * 24 + 1  # every hour of the window, zeros included
    by_ts = {s["ts"]: s for s in out["series"]}
    assert by_ts[(NOW_S - HOUR) // HOUR * HOUR]["sent"] == 2
    assert by_ts[(NOW_S - 3 * HOUR) // HOUR * HOUR]["opened"] == 1
    assert sum(s["sent"] for s in out["series"]) == 3

    def groups(dim: str, **kw: Any) -> dict[str, dict[str, int]]:
        res = bi.run(store, bi.Query(NOW_S - 30 * 86400, NOW_S, "day", dim, **kw))
        return {g["key"]: g for g in res["groups"]}

    assert {k: v["sent"] for k, v in groups("tenant").items()} == {"t1": 2, "t2": 1}
    assert groups("tenant")["t1"]["errors"] == 2
    assert {k: (v["sent"], v["bounced"]) for k, v in groups("provider").items()} == {
        "google": (2, 0), "microsoft": (1, 1)}
    assert {k: v["errors"] for k, v in groups("domain").items()} == {"a.test": 0, "b.test": 2}
    # campaign: the message-id prefix, also for engagement events without a batch code
    camp = groups("campaign")["campaign-7"]
    assert (camp["sent"], camp["opened"], camp["clicked"], camp["complained"]) == (1, 1, 1, 1)
    assert {k: v["sent"] for k, v in groups("account").items()} == {"main": 2, "acc2": 1, "": 0}
    # top N by sent, then key
    assert list(groups("tenant", top=1)) == ["t1"]
    # one tenant only
    only = bi.run(store, bi.Query(NOW_S - 30 * 86400, NOW_S, "day", "tenant", tenant_id="t2"))
    assert [g["key"] for g in only["groups"]] == ["t2"] and only["totals"]["sent"] == 1
    assert len(only["series"]) in (30, 31)
    # a longer window reaches the old message
    assert bi.run(store, bi.Query(NOW_S - 60 * 86400, NOW_S, "day"))["totals"]["sent"] == 4


def _figures(out: dict[str, Any]) -> dict[str, Any]:
    """Every number of an answer, by part."""
    return {"totals": out["totals"], "series": {s["ts"]: s for s in out["series"]},
            "groups": {g["key"]: g for g in out["groups"]}}


def test_distinct_messages_vs_events(store: Store) -> None:
    """One message opened three times and clicked twice, one sent and later hard-bounced, one
    complained twice: the event counts count every event, the distinct figures each message once;
    delivered messages exclude the bounced one; unique rates' inputs per group and per bucket."""
    rows = [
        ev("d1", "sent", "m1", NOW_S - 2 * HOUR),
        ev("d2", "open", "m1", NOW_S - 2 * HOUR),
        ev("d3", "open", "m1", NOW_S - HOUR),  # the same message, opened again an hour later
        ev("d4", "open", "m1", NOW_S - HOUR),
        ev("d5", "click", "m1", NOW_S - HOUR),
        ev("d6", "click", "m1", NOW_S - HOUR),
        ev("d7", "sent", "m2", NOW_S - 2 * HOUR, rcpt="z@outlook.com"),
        ev("d8", "bounce", "m2", NOW_S - HOUR, bounce_type="hard", rcpt="z@outlook.com"),
        ev("d9", "sent", "m3", NOW_S - 2 * HOUR, tenant="t2"),
        ev("d10", "complaint", "m3", NOW_S - HOUR, tenant="t2"),
        ev("d11", "complaint", "m3", NOW_S - HOUR, tenant="t2"),
        # the same message id in another tenant is another message
        ev("d12", "open", "m1", NOW_S - HOUR, tenant="t2"),
    ]
    store.insert_events(rows)
    out = bi.run(store, bi.Query(NOW_S - 86400, NOW_S, "hour", "tenant"))
    t = out["totals"]
    assert (t["sent"], t["opened"], t["clicked"], t["complained"]) == (3, 4, 2, 2)  # events
    assert (t["messages_sent"], t["unique_opens"], t["unique_clicks"], t["messages_complained"]) == (3, 2, 1, 1)
    assert (t["delivered"], t["messages_delivered"], t["messages_bounced"]) == (2, 2, 1)
    g = _figures(out)["groups"]
    assert (g["t1"]["opened"], g["t1"]["unique_opens"], g["t1"]["messages_delivered"]) == (3, 1, 1)
    assert (g["t2"]["complained"], g["t2"]["messages_complained"], g["t2"]["unique_opens"]) == (2, 1, 1)
    # per bucket: distinct within each hour (m1 is opened in two hours: once in each)
    series = _figures(out)["series"]
    last = series[(NOW_S - HOUR) // HOUR * HOUR]
    assert (last["opened"], last["unique_opens"]) == (3, 2)  # t1's m1 twice + t2's m1
    # the window's figure is distinct over the whole window, not a sum of the buckets
    assert sum(s["unique_opens"] for s in out["series"]) == 3 and t["unique_opens"] == 2
    # every dimension's groups carry the distinct figures of their own rows
    prov = _figures(bi.run(store, bi.Query(NOW_S - 86400, NOW_S, "day", "provider")))["groups"]
    assert (prov["google"]["opened"], prov["google"]["unique_opens"], prov["google"]["messages_sent"]) == (4, 2, 2)
    assert (prov["microsoft"]["messages_sent"], prov["microsoft"]["messages_delivered"]) == (1, 0)
    # distinct=False: the event counts only (no zeros passed off as figures)
    lean = bi.run(store, bi.Query(NOW_S - 86400, NOW_S, "hour", "tenant", distinct=False))
    assert "unique_opens" not in lean["totals"] and "messages_sent" not in lean["groups"][0]
    assert "unique_opens" not in lean["series"][0] and lean["totals"]["opened"] == 4


def test_replayed_events_do_not_double_count_distinct_figures(store: Store) -> None:
    """The same events loaded twice (a batch re-loaded after a crash between its insert and its
    offsets, or replayed): every event count doubles (the positive control: the copies are in the
    tables), every distinct figure (totals, series, groups of every dimension) stays the same."""
    rows = _load(store)
    queries = [bi.Query(NOW_S - 30 * 86400, NOW_S, bucket, dim, top=100)
               for bucket in ("hour", "day") for dim in (None, *bi.DIMENSIONS)]
    before = [_figures(bi.run(store, q)) for q in queries]
    store.insert_events(rows)  # the same events again, same ids, same times
    after = [_figures(bi.run(store, q)) for q in queries]
    for b, a in zip(before, after, strict=True):
        for f in bi.FIELDS:
            assert a["totals"][f] == 2 * b["totals"][f], f  # event counts: duplicated
        for f in bi.DISTINCT_FIELDS:
            assert a["totals"][f] == b["totals"][f], f
        assert a["totals"]["messages_sent"] == 3 and a["totals"]["sent"] == 6
        assert set(a["groups"]) == set(b["groups"])
        for key, grp in a["groups"].items():
            assert {f: grp[f] for f in bi.DISTINCT_FIELDS} == {f: b["groups"][key][f] for f in bi.DISTINCT_FIELDS}
            assert grp["sent"] == 2 * b["groups"][key]["sent"]
        for ts, bucket in a["series"].items():
            assert {f: bucket[f] for f in bi.DISTINCT_FIELDS} == {f: b["series"][ts][f] for f in bi.DISTINCT_FIELDS}
    # ... and after ClickHouse merged the parts, the same distinct answers again
    for table in ("bi_tenant_distinct_hourly", "bi_dim_distinct_hourly"):
        store._client.command(f"OPTIMIZE TABLE {table} FINAL")
    assert [_figures(bi.run(store, q))["totals"] for q in queries] == [a["totals"] for a in after]


def test_distinct_figures_exact_up_to_4096_then_estimated_and_still_idempotent(store: Store) -> None:
    """uniqCombined64 (docs/bi.md, "Exact or approximate"): a figure of up to 4,096 messages is
    exact; above, an estimate within 1 % (0.3 % typical); a re-loaded batch changes neither."""
    small = [ev(f"s{i}", "sent", f"small-{i}", NOW_S - HOUR, tenant="t-small") for i in range(4096)]
    big = [ev(f"b{i}", "sent", f"big-{i}", NOW_S - HOUR - (i % 48) * HOUR, tenant="t-big") for i in range(20_000)]
    store.insert_events(small + big)
    q = bi.Query(NOW_S - 3 * 86400, NOW_S, "day", "tenant")
    first = _figures(bi.run(store, q))
    assert first["groups"]["t-small"]["messages_sent"] == 4096  # exact
    assert first["groups"]["t-big"]["sent"] == 20_000
    assert abs(first["groups"]["t-big"]["messages_sent"] - 20_000) <= 200  # estimated, within 1 %
    assert abs(first["totals"]["messages_sent"] - 24_096) <= 241
    store.insert_events(big[:10_000] + small)  # re-loaded: same events again
    again = _figures(bi.run(store, q))
    assert again["totals"]["sent"] == 24_096 + 14_096  # positive control: the copies are counted as events
    assert {k: again["totals"][k] for k in bi.DISTINCT_FIELDS} == {k: first["totals"][k] for k in bi.DISTINCT_FIELDS}
    assert again["groups"]["t-big"]["messages_sent"] == first["groups"]["t-big"]["messages_sent"]
    per_day = [[s["messages_sent"] for s in f["series"].values()] for f in (first, again)]
    assert per_day[0] == per_day[1] and sum(per_day[0]) > 0


def test_backfill_distinct_tables_on_a_store_that_had_the_summing_ones(tmp_path) -> None:
    """A store from before the distinct tables (summing tables backfilled, version 2 recorded):
    start-up fills only the distinct tables from the events; the event counts are not summed twice."""
    s = Store(f"chdb://{tmp_path / 'ch'}")
    s.create()
    try:
        _load(s)
        q = bi.Query(NOW_S - 30 * 86400, NOW_S, "day", "provider")
        full = bi.run(s, q)
        for stmt in ("DROP VIEW bi_tenant_distinct_hourly_mv", "DROP VIEW bi_dim_distinct_hourly_mv",
                     "DROP TABLE bi_tenant_distinct_hourly", "DROP TABLE bi_dim_distinct_hourly"):
            s._client.command(stmt)
        s._client.command("ALTER TABLE bi_backfill DELETE WHERE version = 4 SETTINGS mutations_sync = 1")
        s.create()  # start-up of the new code
        assert bi.run(s, q) == full
        assert full["totals"]["sent"] == 3 and full["totals"]["messages_sent"] == 3
        versions = s._client.query("SELECT version FROM bi_backfill ORDER BY version").result_rows
        assert [v[0] for v in versions] == [bi.BACKFILL_VERSION, bi.DISTINCT_BACKFILL_VERSION]
    finally:
        s.close()


def test_backfill_once_and_replay_reset(tmp_path) -> None:
    """Events loaded before bi_hourly existed are counted once (backfill recorded); a reset (replay)
    rebuilds from what is re-ingested and gives the same answers."""
    s = Store(f"chdb://{tmp_path / 'ch'}")
    s.create()
    try:
        for stmt in bi.DROP:  # an older store: events without the BI tables
            s._client.command(stmt)
        rows = _load(s)
        q = bi.Query(NOW_S - 30 * 86400, NOW_S, "day", "tenant")
        s.create()  # start-up: creates the tables, backfills
        first = bi.run(s, q)
        assert first["totals"]["sent"] == 3
        s.create()  # the next start-up: recorded, not run again
        assert bi.run(s, q) == first
        assert s._client.query("SELECT count() FROM bi_backfill").result_rows[0][0] == 2  # one per table set
        s.reset()  # replay: dropped and recreated empty, then the topic is re-read
        assert bi.run(s, q)["totals"]["sent"] == 0
        s.insert_events(rows)
        assert bi.run(s, q) == first
    finally:
        s.close()


def test_internal_route_answers_422_and_503(store: Store) -> None:
    """GET /internal/bi/metrics: the internal credential, 422 for a bad request, 503
    STORE_UNAVAILABLE while ClickHouse fails (then 200 again)."""
    from clickhouse_connect.driver.exceptions import OperationalError
    from fastapi.testclient import TestClient

    from services.metrics.app import MetricsSettings, create_app

    token = "unit-internal-token-bi-0123456789"
    _load(store)
    settings = MetricsSettings(metrics_ingest=False, kafka_bootstrap="127.0.0.1:1", internal_token=token)
    window = {"from_ts": NOW_S - 86400, "to_ts": NOW_S, "group_by": "tenant"}

    class Down:
        def query(self, *_: Any, **__: Any) -> Any:
            raise OperationalError("Error HTTPConnectionPool: Max retries exceeded (Connection refused)")

    with TestClient(create_app(settings, store=store), raise_server_exceptions=False) as client:
        assert client.get("/internal/bi/metrics", params=window).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        r = client.get("/internal/bi/metrics", params=window, headers=auth)
        assert r.status_code == 200 and r.json()["totals"]["sent"] == 3  # positive control
        assert [g["key"] for g in r.json()["groups"]] == ["t1", "t2"]
        r = client.get("/internal/bi/metrics", params={**window, "bucket": "week"}, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"
        real, store._client = store._client, Down()  # type: ignore[assignment]
        try:
            r = client.get("/internal/bi/metrics", params=window, headers=auth)
            assert r.status_code == 503 and r.json()["error"]["code"] == "STORE_UNAVAILABLE"
        finally:
            store._client = real
        assert client.get("/internal/bi/metrics", params=window, headers=auth).status_code == 200
