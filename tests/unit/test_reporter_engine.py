"""The flusher against an in-process HTTP transport: batches, auth, ack, retry, queued, DND."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx

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


def make(
    client: Client, tenant: dict[str, Any] | None, **settings: Any
) -> tuple[Reporter, list[tuple[str, int]]]:
    acked: list[tuple[str, int]] = []

    async def ack(entries: list[tuple[str, int]]) -> None:
        acked.extend(entries)

    s = Settings(reporter_flush_ms=10, reporter_retry_max_s=0.05, reporter_batch_size=3, **settings)
    http = httpx.AsyncClient(transport=httpx.MockTransport(client.handler))
    rep = Reporter(s, lambda tid: tenant if tid == "acme" else None, ack, lambda enc: f"dec({enc})", http)
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
        assert str(req.url) == "http://client.test/mail-proxy/sync"
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
