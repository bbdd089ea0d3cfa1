"""BI aggregates API (GET /api/v1/bi/metrics, docs/bi.md) against the real system: real sends for
two tenants (one delivered + one 550-rejected, one delivered + opened twice through the tracking
pixel: two open events, one unique open),
read at once after the delivery reports (the route waits for the metrics ingest to hold every
event on the topic), as the admin, a bi:read principal and each tenant."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.supervisor import LocalSystem
from services.common.avro import DecodeError, codec
from services.common.topics import EVENTS, topic_partitions
from tests.conftest import BI_TOKEN, SUPPORT_TOKEN, Tenant, wait_until
from tests.integration.test_durability import _all_topic_bytes

HTML = '<html><body><p>Hi</p><a href="https://example.org/x">go</a></body></html>'
COUNTS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors")
RATES = ("delivery_rate", "bounce_rate", "complaint_rate", "open_rate", "click_rate")
DISTINCT = ("messages_sent", "messages_delivered", "messages_bounced", "messages_complained", "unique_opens",
            "unique_clicks")
DISTINCT_RATES = ("message_delivery_rate", "message_bounce_rate", "message_complaint_rate", "unique_open_rate",
                  "unique_click_rate")


def _bi(system: LocalSystem, token: str | None, bearer: bool = False, **params: Any) -> httpx.Response:
    headers = {} if token is None else ({"Authorization": f"Bearer {token}"} if bearer else {"X-API-Token": token})
    return httpx.get(f"{system.url('api')}/api/v1/bi/metrics", params=params, headers=headers, timeout=60)


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    return body["data"]  # type: ignore[no-any-return]


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code and body["error"]["message"]
    assert "data" not in body and "totals" not in r.text  # nothing was read


def _groups(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["key"]: g for g in data["groups"]}


def _send_and_report(system: LocalSystem, new_tenant, smtp) -> tuple[Tenant, Tenant, str, dict[str, int]]:
    a: Tenant = new_tenant(tracking={"opens": True, "clicks": False})
    b: Tenant = new_tenant()
    r = a.http.post("/commands/add-messages", json={"messages": [
        a.message("bi-a-1", body=HTML, content_type="html", to=["reader@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    r = b.http.post("/commands/add-messages", json={"messages": [
        b.message("bi-b-ok"), b.message("bi-b-bad", to=["reject@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 2, r.text
    # the delivery reports come from the events topic: once they are here, the events are on it
    a.client.wait_for_reports(lambda rs: any(x["id"] == "bi-a-1" and "sent_ts" in x for x in rs), timeout=60)
    b.client.wait_for_reports(lambda rs: {x["id"] for x in rs if "sent_ts" in x or "error_ts" in x}
                              >= {"bi-b-ok", "bi-b-bad"}, timeout=60)
    mail = next(m for m in smtp.messages if m.message["X-Postbus-Tenant"] == a.id
                and m.message["X-Postbus-Message-Id"] == "bi-a-1")
    pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', mail.message.get_body(("html",)).get_content()).group(1)
    now = int(time.time())
    return a, b, pixel, {"from_ts": now - 3600, "to_ts": now + 60}


def test_bi_aggregates_across_tenants_and_per_tenant(system: LocalSystem, new_tenant, smtp) -> None:
    a, b, pixel, window = _send_and_report(system, new_tenant, smtp)

    # at once, no wait: the tenant's own numbers (Bearer works for tenant keys, as on the SMTP API)
    own_b = _ok(_bi(system, b.api_key, bearer=True, group_by="tenant", **window))
    assert {k: own_b["totals"][k] for k in COUNTS} == {"sent": 1, "delivered": 1, "bounced": 0, "complained": 0,
                                                       "opened": 0, "clicked": 0, "deferred": 0, "errors": 1}
    assert own_b["totals"]["delivery_rate"] == 1.0 and set(RATES) <= set(own_b["totals"])
    assert {k: own_b["totals"][k] for k in DISTINCT} == {"messages_sent": 1, "messages_delivered": 1,
                                                         "messages_bounced": 0, "messages_complained": 0,
                                                         "unique_opens": 0, "unique_clicks": 0}
    assert own_b["totals"]["message_delivery_rate"] == 1.0 and set(DISTINCT_RATES) <= set(own_b["totals"])
    assert _groups(own_b)[b.id]["messages_sent"] == 1 and sum(s["messages_sent"] for s in own_b["series"]) == 1
    assert list(_groups(own_b)) == [b.id]  # its own tenant only, even grouped by tenant
    assert _groups(own_b)[b.id]["reputation_band"] == "healthy"
    assert sum(s["sent"] for s in own_b["series"]) == 1 and sum(s["errors"] for s in own_b["series"]) == 1
    assert all(s["ts"] % 3600 == 0 for s in own_b["series"])
    own_a = _ok(_bi(system, a.api_key, **window))
    assert own_a["totals"]["sent"] == 1 and own_a["totals"]["errors"] == 0 and own_a["groups"] == []

    # an open through the tracking pixel becomes an event (API command -> sender -> events topic)
    with httpx.Client(timeout=30) as anon:
        assert anon.get(pixel).status_code == 200
    wait_until(lambda: _ok(_bi(system, a.api_key, **window))["totals"]["opened"] == 1, timeout=60,
               what="the open counted")
    once = _ok(_bi(system, a.api_key, **window))["totals"]
    assert (once["opened"], once["unique_opens"], once["open_rate"], once["unique_open_rate"]) == (1, 1, 1.0, 1.0)
    # the reader opens it again: two open events (the event count shows it), still one message opened
    with httpx.Client(timeout=30) as anon:
        assert anon.get(pixel).status_code == 200
    wait_until(lambda: _ok(_bi(system, a.api_key, **window))["totals"]["opened"] == 2, timeout=60,
               what="the second open counted")
    twice = _ok(_bi(system, a.api_key, group_by="tenant", **window))
    assert (twice["totals"]["opened"], twice["totals"]["unique_opens"]) == (2, 1)
    assert (twice["totals"]["open_rate"], twice["totals"]["unique_open_rate"]) == (2.0, 1.0)
    assert (_groups(twice)[a.id]["opened"], _groups(twice)[a.id]["unique_opens"]) == (2, 1)
    assert twice["totals"]["messages_sent"] == 1 and twice["totals"]["messages_delivered"] == 1
    # distinct=false: the event counts only
    lean = _ok(_bi(system, a.api_key, distinct="false", **window))
    assert lean["totals"]["opened"] == 2 and "unique_opens" not in lean["totals"] and lean["distinct"] is False

    # admin and the bi:read principal: across tenants, the same numbers
    for token in (system.admin_token, BI_TOKEN):
        data = _ok(_bi(system, token, group_by="tenant", top=100, **window))
        groups = _groups(data)
        assert (groups[a.id]["sent"], groups[a.id]["opened"], groups[a.id]["errors"]) == (1, 2, 0)
        ga = groups[a.id]
        assert (ga["unique_opens"], ga["unique_open_rate"], ga["open_rate"]) == (1, 1.0, 2.0)
        assert (groups[b.id]["sent"], groups[b.id]["delivered"], groups[b.id]["errors"]) == (1, 1, 1)
        assert data["totals"]["sent"] >= 2 and data["totals"]["errors"] >= 1 and data["totals"]["opened"] >= 1
        assert data["totals"]["sent"] >= sum(g["sent"] for g in data["groups"])
        # a cross-tenant filter by tenant gives that tenant's own answer
        only_b = _ok(_bi(system, token, tenant_id=b.id, **window))
        assert only_b["totals"] == own_b["totals"]
        # day buckets from the hourly table: the same totals
        day = _ok(_bi(system, token, bucket="day", tenant_id=a.id, group_by="provider", **window))
        assert day["totals"]["sent"] == 1 and all(s["ts"] % 86400 == 0 for s in day["series"])
        assert [g["key"] for g in day["groups"]] == ["example.test"]
        dom = _ok(_bi(system, token, tenant_id=a.id, group_by="domain", **window))
        # the open event carries no sending domain (engagement events, docs/bi.md): key ''
        assert {g["key"]: (g["sent"], g["opened"], g["unique_opens"]) for g in dom["groups"]} == {
            f"{a.id}.test": (1, 0, 0), "": (0, 2, 1)}
        acct = _ok(_bi(system, token, tenant_id=b.id, group_by="account", **window))
        assert _groups(acct)["main"]["sent"] == 1


def test_bi_refusals(system: LocalSystem, new_tenant, smtp) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    r = b.http.post("/commands/add-messages", json={"messages": [b.message("bi-secret-1")]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    b.client.wait_for_reports(lambda rs: any(x["id"] == "bi-secret-1" and "sent_ts" in x for x in rs), timeout=60)
    now = int(time.time())
    window = {"from_ts": now - 3600, "to_ts": now + 60}

    # positive controls: b reads its own send; the bi:read principal reads b's numbers
    assert _ok(_bi(system, b.api_key, **window))["totals"]["sent"] == 1
    assert _ok(_bi(system, BI_TOKEN, tenant_id=b.id, **window))["totals"]["sent"] == 1
    # the principal's access is in the audit log (the command topic), its token is not
    data = _all_topic_bytes(system.kafka_bootstrap)
    assert b"support.access" in data and b"support:carol-bi" in data and BI_TOKEN.encode() not in data
    # a tenant key naming another tenant: 403, nothing read
    _refused(_bi(system, a.api_key, tenant_id=b.id, **window), 403, "INSUFFICIENT_PERMISSIONS")
    _refused(_bi(system, a.api_key, bearer=True, tenant_id=b.id, group_by="tenant", **window), 403,
             "INSUFFICIENT_PERMISSIONS")
    # ... and without a filter it sees its own tenant only (b's send is not in a's answer)
    r = _bi(system, a.api_key, group_by="tenant", **window)
    mine = _ok(r)
    assert mine["totals"]["sent"] == 0 and b.id not in r.text and mine["groups"] == []
    # a support principal without bi:read: 403 (it holds smtp:read + tenant:read)
    _refused(_bi(system, SUPPORT_TOKEN, **window), 403, "INSUFFICIENT_PERMISSIONS")
    _refused(_bi(system, SUPPORT_TOKEN, tenant_id=b.id, **window), 403, "INSUFFICIENT_PERMISSIONS")
    # no token / a wrong token: 401
    _refused(_bi(system, None, **window), 401, "AUTHENTICATION_REQUIRED")
    _refused(_bi(system, "not-a-token", **window), 401, "AUTHENTICATION_REQUIRED")
    # bad bucket / group_by / top / window: 422
    _refused(_bi(system, system.admin_token, bucket="week", **window), 422, "VALIDATION_ERROR")
    _refused(_bi(system, system.admin_token, group_by="country", **window), 422, "VALIDATION_ERROR")
    _refused(_bi(system, system.admin_token, top=1000, **window), 422, "VALIDATION_ERROR")
    _refused(_bi(system, system.admin_token, from_ts=now, to_ts=now - 10), 422, "VALIDATION_ERROR")
    _refused(_bi(system, b.api_key, bucket="week", **window), 422, "VALIDATION_ERROR")


def _redeliver_events_of(bootstrap: str, tenant_id: str) -> int:
    """Write every record of the events topic that belongs to ``tenant_id`` a second time, byte
    for byte, to its own partition (what a producer retry or a re-played batch leaves on the log):
    the metrics ingest loads each event again. Returns how many were re-written."""
    async def run() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await consumer.start()
        await producer.start()
        try:
            tps = [TopicPartition(EVENTS, p) for p in await topic_partitions(consumer, EVENTS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            mine = []
            deadline = asyncio.get_running_loop().time() + 30
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                assert asyncio.get_running_loop().time() < deadline, "could not read the events topic"
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for rec in records:
                        if rec.offset >= ends[tp]:
                            continue
                        try:
                            _, ev = codec().decode(rec.value, expect="DeliveryEvent")
                        except DecodeError:
                            continue
                        if ev["tenant_id"] == tenant_id:
                            mine.append((tp.partition, rec.key, rec.value, list(rec.headers or ())))
            for partition, key, value, headers in mine:
                await producer.send_and_wait(EVENTS, value, key=key, partition=partition, headers=headers)
            return len(mine)
        finally:
            await producer.stop()
            await consumer.stop()

    return asyncio.run(run())


def test_bi_redelivered_events_do_not_double_count_distinct_figures(system: LocalSystem, new_tenant,
                                                                     smtp) -> None:
    """Every event of a tenant reaches the metrics store twice (re-written to the events topic):
    the event counts double (the positive control: the copies were loaded and counted), the
    distinct-message figures (totals, per-group, per-bucket; the tenant's key and the admin's
    cross-tenant view) stay the same."""
    a: Tenant = new_tenant(tracking={"opens": True, "clicks": False})
    r = a.http.post("/commands/add-messages", json={"messages": [
        a.message("bi-dup-1", body=HTML, content_type="html", to=["reader@example.test"]),
        a.message("bi-dup-2", to=["other@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 2, r.text
    a.client.wait_for_reports(lambda rs: {x["id"] for x in rs if "sent_ts" in x} >= {"bi-dup-1", "bi-dup-2"},
                              timeout=60)
    mail = next(m for m in smtp.messages if m.message["X-Postbus-Tenant"] == a.id
                and m.message["X-Postbus-Message-Id"] == "bi-dup-1")
    pixel = re.search(r'src="([^"]+/t/o/[^"]+)"', mail.message.get_body(("html",)).get_content()).group(1)
    with httpx.Client(timeout=30) as anon:
        for _ in range(2):
            assert anon.get(pixel).status_code == 200
    now = int(time.time())
    window = {"from_ts": now - 3600, "to_ts": now + 60}
    wait_until(lambda: _ok(_bi(system, a.api_key, **window))["totals"]["opened"] == 2, timeout=60,
               what="both opens counted")

    def answers() -> dict[str, dict[str, Any]]:
        own = _ok(_bi(system, a.api_key, group_by="provider", **window))
        cross = _ok(_bi(system, system.admin_token, group_by="tenant", top=100, **window))
        return {"totals": own["totals"], "provider": _groups(own)["example.test"], "tenant": _groups(cross)[a.id],
                "series": {s["ts"]: s for s in own["series"] if s["sent"] or s["opened"]}}

    before = answers()
    assert (before["totals"]["sent"], before["totals"]["opened"]) == (2, 2)
    assert {k: before["totals"][k] for k in ("messages_sent", "messages_delivered", "unique_opens")} == {
        "messages_sent": 2, "messages_delivered": 2, "unique_opens": 1}

    assert _redeliver_events_of(system.kafka_bootstrap, a.id) == 4  # 2 sent + 2 open
    # the copies are loaded: every event count doubles (read-your-writes: the route waits for them)
    wait_until(lambda: _ok(_bi(system, a.api_key, **window))["totals"]["sent"] == 4, timeout=60,
               what="the re-delivered events loaded")
    after = answers()
    assert (after["totals"]["sent"], after["totals"]["opened"], after["totals"]["delivered"]) == (4, 4, 4)
    assert (after["tenant"]["sent"], after["provider"]["opened"]) == (4, 4)
    # ... and no distinct figure moved
    for part in ("totals", "provider", "tenant"):
        assert {k: after[part][k] for k in DISTINCT + DISTINCT_RATES} == \
            {k: before[part][k] for k in DISTINCT + DISTINCT_RATES}, part
    assert set(after["series"]) == set(before["series"])
    for ts, bucket in after["series"].items():
        assert {k: bucket[k] for k in DISTINCT} == {k: before["series"][ts][k] for k in DISTINCT}
    assert after["totals"]["unique_open_rate"] == 0.5 and after["totals"]["message_delivery_rate"] == 1.0
