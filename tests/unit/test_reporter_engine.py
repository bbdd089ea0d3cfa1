"""The flusher against an in-process HTTP transport: batches, auth, ack, retry, queued, DND."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx

from services.common.netpolicy import NetPolicy
from services.common.settings import Settings
from services.reporter.engine import Reporter


class Client:
    """A scripted sync endpoint: answers[i] for the i-th call, the last one repeated."""

    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[httpx.Request, dict[str, Any]]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request, json.loads(request.content)))
        status, body = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=raw)


def resolving_to(*addresses: str) -> NetPolicy:
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return NetPolicy(resolver=resolver)


def make(
    client: Client, tenant: dict[str, Any] | None, net: NetPolicy | None = None, **settings: Any
) -> tuple[Reporter, list[tuple[str, int]]]:
    acked: list[tuple[str, int]] = []

    async def ack(entries: list[tuple[str, int]]) -> None:
        acked.extend(entries)

    s = Settings(reporter_flush_ms=10, reporter_retry_max_s=0.05, reporter_batch_size=3, **settings)
    http = httpx.AsyncClient(transport=httpx.MockTransport(client.handler))
    rep = Reporter(s, lambda tid: tenant if tid == "acme" else None, ack, lambda enc: f"dec({enc})", http,
                   net or resolving_to("93.184.216.34"))
    return rep, acked


TENANT = {"id": "acme", "active": True, "client_base_url": "http://client.test", "client_sync_path": None,
          "client_auth_method": "bearer", "client_auth_secret_enc": "ENC"}


def item(i: int) -> dict[str, Any]:
    return {"id": f"M{i}", "tenant_id": "acme", "pk": None, "sent_ts": 1.0}


async def wait_until(cond: Any, limit_s: float = 3.0) -> None:
    for _ in range(int(limit_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_batches_are_posted_with_auth_and_acknowledged() -> None:
    client = Client([(200, {"ok": True, "next_sync_after": 4e9})])
    rep, acked = make(client, TENANT)
    for i in range(7):
        rep.add("acme", f"acme\x1fe{i}", item(i), 5)
    await rep.start()
    try:
        await wait_until(lambda: len(acked) == 7)
        # the first call may be the idle call of a never-synced tenant; event calls follow in order
        sizes = [len(body["delivery_report"]) for _, body in client.calls if body["delivery_report"]]
        assert sizes == [3, 3, 1]
        req = client.calls[0][0]
        # connected to the checked address, named as the tenant configured it
        assert str(req.url) == "http://93.184.216.34/mail-proxy/sync"
        assert req.headers["host"] == "client.test"
        assert req.headers["authorization"] == "Bearer dec(ENC)"
        assert acked[0] == ("acme\x1fe0", 5)
        assert rep.pending_count() == 0
        st = rep.sync_status()["acme"]
        assert st["in_dnd"] is True and st["pending"] == 0
        n = len(client.calls)
        await asyncio.sleep(0.2)
        assert len(client.calls) == n  # DND: no idle calls
    finally:
        await rep.stop()


async def test_failure_keeps_reports_and_retries_then_acks() -> None:
    client = Client([(503, b"down"), (200, b"not json"), (200, {"ok": True})])
    rep, acked = make(client, {**TENANT, "client_auth_method": "basic", "client_auth_user": "u"})
    rep.add("acme", "acme\x1fe1", item(1), 0)
    await rep.start()
    try:
        await wait_until(lambda: len(acked) == 1)
        assert len(client.calls) == 3
        assert all(body["delivery_report"] == [item(1)] for _, body in client.calls)
        expected = "Basic " + base64.b64encode(b"u:dec(ENC)").decode()
        assert client.calls[0][0].headers["authorization"] == expected
        assert rep.sync_status()["acme"]["failures"] == 0
    finally:
        await rep.stop()


async def test_queued_triggers_immediate_recalls() -> None:
    client = Client([(200, {"ok": True, "queued": 5}), (200, {"ok": True, "queued": 2}), (200, {"ok": True})])
    rep, _ = make(client, TENANT, reporter_sync_interval_s=3600)
    rep.on_tenant_change("acme", TENANT)  # what the tenant config view does at start-up
    await rep.start()
    try:
        await wait_until(lambda: len(client.calls) >= 3)
        await asyncio.sleep(0.1)
        assert len(client.calls) == 3  # queued: 0 ends the accelerated loop
    finally:
        await rep.stop()


async def test_unknown_tenant_keeps_reports() -> None:
    client = Client([(200, {"ok": True})])
    rep, acked = make(client, TENANT)
    rep.add("ghost", "ghost\x1fe1", item(1), 2)
    await rep.start()
    try:
        await asyncio.sleep(0.1)
        assert acked == [] and rep.pending_count() == 1
    finally:
        await rep.stop()


async def test_run_now_override_clears_dnd() -> None:
    client = Client([(200, {"ok": True, "next_sync_after": 4e9})])
    rep, _ = make(client, TENANT)
    rep.on_tenant_change("acme", TENANT)
    await rep.start()
    try:
        await wait_until(lambda: len(client.calls) == 1)
        rep.run_now(None)  # admin: respects DND
        await asyncio.sleep(0.1)
        assert len(client.calls) == 1
        rep.run_now("acme", override_dnd=True)
        await wait_until(lambda: len(client.calls) == 2)
    finally:
        await rep.stop()


async def _one_call(net: NetPolicy, answers: list[tuple[int, Any]] | None = None,
                    tenant: dict[str, Any] | None = None) -> tuple[Client, Reporter, list[tuple[str, int]]]:
    client = Client(answers or [(200, {"ok": True})])
    rep, acked = make(client, tenant or TENANT, net)
    rep.add("acme", "acme\x1fe1", item(1), 0)
    await rep.start()
    return client, rep, acked


async def test_a_name_resolving_to_loopback_is_never_called() -> None:
    # positive control: the same tenant, the same reporter code, a public address -> called and acked
    client, rep, acked = await _one_call(resolving_to("93.184.216.34"))
    try:
        await wait_until(lambda: len(acked) == 1)
    finally:
        await rep.stop()
    for bad in (["127.0.0.1"], ["::1"], ["::ffff:127.0.0.1"], ["169.254.169.254"], ["10.0.0.5"],
                ["93.184.216.34", "127.0.0.1"]):  # one bad address among good ones is enough to refuse
        client, rep, acked = await _one_call(resolving_to(*bad))
        try:
            await wait_until(lambda r=rep: r.state["acme"].last_outcome == "blocked")
            assert client.calls == [] and acked == [] and rep.pending_count() == 1, bad
        finally:
            await rep.stop()


async def test_operator_listed_private_network_is_allowed() -> None:
    import ipaddress

    async def resolver(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    net = NetPolicy(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),), resolver=resolver)
    client, rep, acked = await _one_call(net)
    try:
        await wait_until(lambda: len(acked) == 1)
        assert client.calls[0][0].url.host == "10.1.2.3"
    finally:
        await rep.stop()


async def test_redirect_is_not_followed_and_not_acknowledged() -> None:
    client = Client([(307, b""), (200, {"ok": True})])
    original = client.handler

    def handler(request: httpx.Request) -> httpx.Response:
        resp = original(request)
        if resp.status_code == 307:
            return httpx.Response(307, headers={"location": "http://127.0.0.1:8010/internal/replay"})
        return resp

    client.handler = handler  # type: ignore[method-assign]
    rep, acked = make(client, TENANT)
    rep.add("acme", "acme\x1fe1", item(1), 0)
    await rep.start()
    try:
        await wait_until(lambda: len(acked) == 1)  # the retry to the configured URL acknowledges
        hosts = {req.url.host for req, _ in client.calls}
        assert hosts == {"93.184.216.34"}, hosts  # never the redirect target
    finally:
        await rep.stop()


async def test_an_oversized_answer_is_not_an_acknowledgement() -> None:
    client, rep, acked = await _one_call(resolving_to("93.184.216.34"),
                                         [(200, b'{"ok": true, "x": "' + b"a" * (2 * 1024 * 1024) + b'"}'),
                                          (200, {"ok": True})])
    try:
        await wait_until(lambda: len(acked) == 1)
        assert len(client.calls) >= 2  # the first (oversized) answer did not count
    finally:
        await rep.stop()


async def test_admin_run_now_forces_only_pending_tenants_and_never_an_inactive_one() -> None:
    client = Client([(200, {"ok": True, "next_sync_after": 4e9})])
    tenants = {"acme": dict(TENANT), "idle": {**TENANT, "id": "idle", "client_base_url": "http://idle.test"},
               "off": {**TENANT, "id": "off", "active": False, "client_base_url": "http://off.test"}}
    acked: list[tuple[str, int]] = []

    async def ack(entries: list[tuple[str, int]]) -> None:
        acked.extend(entries)

    s = Settings(reporter_flush_ms=10, reporter_retry_max_s=0.05, reporter_batch_size=3)
    http = httpx.AsyncClient(transport=httpx.MockTransport(client.handler))
    rep = Reporter(s, tenants.get, ack, lambda enc: f"dec({enc})", http, resolving_to("93.184.216.34"))
    for tid in tenants:
        rep.restore(tid, 1.0, 4e9)  # every tenant in DND: no call of its own
    await rep.start()
    try:
        rep.run_now(None)  # admin, nothing pending anywhere: no forced empty calls
        await asyncio.sleep(0.2)
        assert client.calls == []
        rep.add("acme", "acme\x1fe2", item(2), 0)
        rep.run_now(None)
        await wait_until(lambda: ("acme\x1fe2", 0) in acked)
        assert {req.headers["host"] for req, _ in client.calls} == {"client.test"}  # only the pending tenant
        # positive control: an active tenant's own run-now overrides its DND with an empty call
        rep.run_now("idle", override_dnd=True)
        await wait_until(lambda: any(req.headers["host"] == "idle.test" for req, _ in client.calls))
        rep.run_now("off", override_dnd=True)  # an inactive tenant: never
        await asyncio.sleep(0.3)
        assert not any(req.headers["host"] == "off.test" for req, _ in client.calls)
    finally:
        await rep.stop()


async def test_reports_arriving_during_a_call_linger_before_the_next() -> None:
    """A call that took every pending report: those arriving while it runs wait the linger from
    their arrival (then one call for all of them), not a call at once after it (under a steady
    flow: ever smaller calls back to back, each one an HTTP call and a Kafka flush)."""
    client = Client([(200, {"ok": True, "next_sync_after": 4e9})])
    acked: list[tuple[str, int]] = []
    gate = asyncio.Event()

    async def slow_ack(entries: list[tuple[str, int]]) -> None:
        await gate.wait()  # the first call is "in flight" until the test releases it
        acked.extend(entries)

    s = Settings(reporter_flush_ms=400, reporter_retry_max_s=0.05, reporter_batch_size=100)
    http = httpx.AsyncClient(transport=httpx.MockTransport(client.handler))
    rep = Reporter(s, lambda tid: TENANT if tid == "acme" else None, slow_ack, lambda enc: enc, http,
                   resolving_to("93.184.216.34"))
    rep.add("acme", "acme\x1fe0", item(0), 5)
    await rep.start()
    try:
        await wait_until(lambda: any(body["delivery_report"] for _, body in client.calls))
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        for i in range(1, 4):  # arrive during the first call
            rep.add("acme", f"acme\x1fe{i}", item(i), 5)
        gate.set()
        await wait_until(lambda: len(acked) == 1)
        await asyncio.sleep(0.2)
        event_calls = [body["delivery_report"] for _, body in client.calls if body["delivery_report"]]
        assert len(event_calls) == 1, event_calls  # still lingering, half-way through
        await wait_until(lambda: len(acked) == 4)
        assert loop.time() - arrived >= 0.35
        sizes = [len(body["delivery_report"]) for _, body in client.calls if body["delivery_report"]]
        assert sizes == [1, 3], sizes
    finally:
        await rep.stop()
        await http.aclose()
