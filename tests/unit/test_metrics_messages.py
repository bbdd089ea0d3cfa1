"""Message projection, lookup and cleanup queries against the real embedded ClickHouse engine."""

from __future__ import annotations

import time
from typing import Any

from services.metrics import messages as mp
from services.metrics.store import Store, event_row

NOW = int(time.time() * 1000)
S = 1000


def msg(mid: str, tenant: str = "t-a", pk: str | None = None, **kw: Any) -> dict[str, Any]:
    base = {"id": mid, "pk": pk or f"pk-{mid}", "tenant_id": tenant, "account_id": "acc", "from_addr": "a@x.test",
            "to": ["b@y.test"], "subject": f"S {mid}", "priority": 2, "deferred_ts": None, "batch_code": None,
            "accepted_ts": NOW - 100 * S}
    return {**base, **kw}


def add(store: Store, offset: int, *messages: dict[str, Any]) -> None:
    store.insert_rows("messages", mp.message_rows({"messages": list(messages)}, offset), mp.MESSAGE_COLUMNS)


def ev(store: Store, event_id: str, type_: str, mid: str, ts: int, tenant: str = "t-a", pk: str | None = None,
       **kw: Any) -> None:
    row = event_row({"event_id": event_id, "type": type_, "tenant_id": tenant, "message_id": mid,
                     "pk": pk if pk is not None else f"pk-{mid}", "ts": ts, **kw})
    store.insert_events([row])


def ack(store: Store, tenant: str, pairs: list[tuple[str, str]], ts: int) -> None:
    rows = mp.reported_rows({"tenant_id": tenant, "event_ids": [e for e, _ in pairs],
                             "message_ids": [m for _, m in pairs], "ts": ts})
    store.insert_rows("reported", rows, mp.REPORTED_COLUMNS)


def by_id(store: Store, tenant: str = "t-a", **kw: Any) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in mp.list_messages(store, tenant, **kw)["messages"]}


def scenario(store: Store) -> None:
    add(store, 1, msg("m1"), msg("m2", batch_code="b1", priority=0), msg("m3"),
        msg("m4", deferred_ts=NOW + 3600 * S))
    add(store, 2, msg("o1", tenant="t-b"))
    ev(store, "e1", "deferred", "m1", NOW - 50 * S, smtp_code=451, deferred_reason="busy",
       deferred_until=NOW - 40 * S)
    ev(store, "e2", "sent", "m1", NOW - 30 * S, smtp_code=250)
    ev(store, "e3", "error", "m2", NOW - 20 * S, smtp_code=550, error="no such user")
    ev(store, "e4", "rejected", "r1", NOW - 10 * S, pk="", error="invalid address")


def test_projection_fields_status_and_history(store: Store) -> None:
    scenario(store)
    got = by_id(store, include_history=True)
    assert set(got) == {"m1", "m2", "m3", "m4", "r1"}
    m1 = got["m1"]
    assert (m1["status"], m1["sent_ts"], m1["error_ts"], m1["reported_ts"]) == ("sent", (NOW - 30 * S) / 1000,
                                                                               None, None)
    assert (m1["pk"], m1["account_id"], m1["priority"], m1["subject"]) == ("pk-m1", "acc", 2, "S m1")
    assert [(h["type"], h["smtp_code"]) for h in m1["history"]] == [("deferred", 451), ("sent", 250)]
    assert m1["history"][0]["deferred_until"] == (NOW - 40 * S) / 1000
    m2 = got["m2"]
    assert (m2["status"], m2["error"], m2["batch_code"], m2["priority"]) == ("error", "no such user", "b1", 0)
    assert got["m3"]["status"] == "pending" and got["m3"]["history"] == []
    assert got["m4"]["status"] == "deferred" and got["m4"]["deferred_ts"] == (NOW + 3600 * S) / 1000
    assert got["r1"]["status"] == "rejected" and got["r1"]["error"] == "invalid address"
    active = by_id(store, active_only=True)
    assert set(active) == {"m3", "m4"} and "history" not in active["m3"]
    assert set(by_id(store, "t-b")) == {"o1"}
    page = mp.list_messages(store, "t-a", limit=2, offset=1)
    assert page["total"] == 5 and len(page["messages"]) == 2


def test_duplicate_loads_change_nothing(store: Store) -> None:
    scenario(store)
    before = mp.list_messages(store, "t-a", include_history=True)
    scenario(store)  # a batch re-inserted after a crash between insert and offset store
    assert mp.list_messages(store, "t-a", include_history=True) == before


def test_resubmission_replaces_pending_and_marks_hide(store: Store) -> None:
    add(store, 1, msg("m1", pk="pk-old", subject="v1"))
    ev(store, "e1", "deferred", "m1", NOW - 50 * S, pk="pk-old")
    add(store, 3, msg("m1", pk="pk-new", subject="v2"))
    got = by_id(store, include_history=True)["m1"]
    assert (got["pk"], got["subject"], got["status"], got["history"]) == ("pk-new", "v2", "pending", [])
    store.insert_rows("message_marks", mp.mark_rows("t-a", ["m1"], "deleted", 4, NOW), mp.MARK_COLUMNS)
    assert by_id(store) == {}
    add(store, 5, msg("m1", pk="pk-3"))  # submitted again after the delete: visible again
    assert by_id(store)["m1"]["pk"] == "pk-3"
    store.insert_rows("message_marks", mp.mark_rows("t-a", [""], "tenant_deleted", 6, NOW), mp.MARK_COLUMNS)
    assert by_id(store) == {}


def test_lookup_is_tenant_scoped(store: Store) -> None:
    scenario(store)
    got = mp.lookup(store, "t-a", ["m1", "m3", "o1", "m4", "ghost", "m2", "m1"])
    assert got == {"pending": ["m3", "m4"], "final": ["m1", "m2"], "other_tenants": ["o1"]}
    assert mp.lookup(store, "t-b", ["m1", "o1"]) == {"pending": ["o1"], "final": [], "other_tenants": ["m1"]}


def test_reported_ts_and_cleanup_only_fully_reported_old_messages(store: Store) -> None:
    scenario(store)
    assert mp.cleanup_ids(store, "t-a", 0) == []
    ack(store, "t-a", [("e1", "m1")], NOW - 45 * S)
    assert by_id(store)["m1"]["reported_ts"] == (NOW - 45 * S) / 1000
    assert mp.cleanup_ids(store, "t-a", 0) == []  # the sent event is not reported yet
    ack(store, "t-a", [("e2", "m1"), ("e3", "m2")], NOW - 25 * S)
    ack(store, "t-a", [("e2", "m1")], NOW - 25 * S)  # duplicate acknowledgement
    got = by_id(store, include_history=True)
    assert got["m1"]["reported_ts"] == (NOW - 25 * S) / 1000
    assert [h["reported_ts"] for h in got["m1"]["history"]] == [(NOW - 45 * S) / 1000, (NOW - 25 * S) / 1000]
    assert mp.cleanup_ids(store, "t-a", 0) == ["m1", "m2"]
    assert mp.cleanup_ids(store, "t-a", 25, now_ms=NOW) == ["m1"]  # m2's last event is 20 s old
    assert mp.cleanup_ids(store, "t-b", 0) == []
    store.insert_rows("message_marks", mp.mark_rows("t-a", ["m1", "m2"], "cleaned", 9, NOW), mp.MARK_COLUMNS)
    assert set(by_id(store)) == {"m3", "m4", "r1"}
    assert mp.cleanup_ids(store, "t-a", 0) == []


def test_internal_api_contracts(store: Store) -> None:
    from fastapi.testclient import TestClient

    from services.metrics.app import MetricsSettings, create_app

    scenario(store)
    app = create_app(MetricsSettings(metrics_ingest=False, internal_token="unit-internal-token"), store=store)
    with TestClient(app, headers={"X-Internal-Token": "unit-internal-token"}) as client:
        r = client.get("/internal/messages", params={"tenant_id": "t-a", "include_history": "true"})
        assert r.status_code == 200
        body = r.json()
        assert body["total"] == 5 and {m["id"] for m in body["messages"]} == {"m1", "m2", "m3", "m4", "r1"}
        assert all("history" in m for m in body["messages"])
        r = client.get("/internal/messages", params={"tenant_id": "t-a", "active_only": "true", "limit": 1})
        assert r.json()["total"] == 2 and len(r.json()["messages"]) == 1
        assert client.get("/internal/messages").status_code == 422
        r = client.post("/internal/messages/lookup", json={"tenant_id": "t-b", "ids": ["o1", "m1", "zz"]})
        assert r.json() == {"pending": ["o1"], "final": [], "other_tenants": ["m1"]}
        r = client.post("/internal/messages/cleanup", json={"tenant_id": "t-a", "older_than_seconds": 0})
        assert r.json() == {"ids": []}
        assert client.post("/internal/messages/cleanup", json={"tenant_id": "t-a"}).status_code == 422
