"""The internal service credential (common/internal_auth.py): constant-time check, where it is read
from, dev-mode generation, the metrics service's middleware, the authenticated Prometheus port; the
API's /metrics snapshot and its require-admin setting."""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.common import internal_auth
from services.common.http_server import start_metrics_server
from services.common.internal_auth import (
    ERROR_CODE,
    MissingInternalToken,
    auth_headers,
    dev_token,
    load_internal_token,
    presented_token,
    token_matches,
)
from services.common.settings import Settings
from services.metrics.store import Store

TOKEN = "unit-internal-token-0123456789"


# -- the constant-time check ----------------------------------------------------------------------

def test_token_matches_only_the_exact_token() -> None:
    assert token_matches(TOKEN, TOKEN)
    for wrong in ("", None, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), " " + TOKEN, "wrong", "é" * 30):
        assert not token_matches(wrong, TOKEN), wrong
    assert not token_matches("", "")  # an empty expected token never matches
    assert not token_matches(None, "")


def test_token_matches_uses_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(internal_auth.hmac, "compare_digest", spy)
    assert not token_matches("x" * len(TOKEN), TOKEN)
    assert token_matches(TOKEN, TOKEN)
    assert calls == [(b"x" * len(TOKEN), TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_presented_token_reads_both_headers() -> None:
    assert presented_token([("authorization", f"Bearer {TOKEN}")]) == TOKEN
    assert presented_token([("authorization", f"bearer   {TOKEN} ")]) == TOKEN
    assert presented_token([("x-internal-token", TOKEN)]) == TOKEN
    assert presented_token([("authorization", "Bearer other"), ("x-internal-token", TOKEN)]) == TOKEN
    assert presented_token([("authorization", f"Basic {TOKEN}")]) is None
    assert presented_token([("authorization", "Bearer ")]) is None
    assert presented_token([]) is None
    assert auth_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}


# -- where the token comes from -------------------------------------------------------------------

def test_outside_dev_mode_a_missing_or_short_token_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(MissingInternalToken, match="POSTBUS_INTERNAL_TOKEN is not set"):
        load_internal_token(Settings(dev=False, state_dir=tmp_path, internal_token=None))
    with pytest.raises(MissingInternalToken, match="too short") as exc:
        load_internal_token(Settings(dev=False, state_dir=tmp_path, internal_token="short-secret"))
    assert "short-secret" not in str(exc.value)  # never the secret in the message
    assert load_internal_token(Settings(dev=False, state_dir=tmp_path, internal_token=TOKEN)) == TOKEN
    assert not (tmp_path / internal_auth.TOKEN_FILE).exists()


def test_dev_mode_generates_one_token_shared_by_concurrent_services(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        results.append(load_internal_token(Settings(dev=True, state_dir=tmp_path)))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) >= 32
    path = tmp_path / internal_auth.TOKEN_FILE
    assert path.read_text().strip() == results[0]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [internal_auth.TOKEN_FILE]  # no temp files left
    assert dev_token(tmp_path) == results[0]
    # a configured token wins over the generated one, in dev mode too
    assert load_internal_token(Settings(dev=True, state_dir=tmp_path, internal_token=TOKEN)) == TOKEN


# -- the metrics service: every route but /health needs the token ---------------------------------

def test_metrics_service_requires_the_token_outside_dev_mode(tmp_path: Path, store: Store) -> None:
    from services.metrics.app import MetricsSettings, create_app

    with pytest.raises(MissingInternalToken):
        create_app(MetricsSettings(dev=False, state_dir=tmp_path, metrics_ingest=False), store=store)


def test_metrics_service_refuses_every_internal_route_without_the_token(store: Store) -> None:
    from services.metrics.app import MetricsSettings, create_app
    from tests.unit.test_metrics_store import sample

    store.insert_events(sample())
    rows = store.row_count()
    assert rows > 0
    app = create_app(MetricsSettings(metrics_ingest=False, internal_token=TOKEN), store=store)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/internal/messages", {"params": {"tenant_id": "t-a"}}),
        ("GET", "/internal/counters", {}),
        ("GET", "/internal/tenants/t-a/metrics", {}),
        ("GET", "/internal/ingest-status", {}),
        ("POST", "/internal/sent-ids", {"json": {"tenant_id": "t-a", "ids": ["m1"]}}),
        ("POST", "/internal/replay", {}),
        ("GET", "/metrics", {}),
        ("GET", "/openapi.json", {}),
    ]
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # liveness stays public
        # positive control: the same calls with the token work
        good = client.get("/internal/messages", params={"tenant_id": "t-a"}, headers=auth_headers(TOKEN))
        assert good.status_code == 200 and good.json()["messages"]
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"X-Internal-Token": "nope"},
                        {"Authorization": f"Basic {TOKEN}"}, {"X-API-Token": TOKEN}):
            for method, path, kw in calls:
                r = client.request(method, path, headers=headers, **kw)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == ERROR_CODE
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert TOKEN not in r.text
        assert store.row_count() == rows  # the refused replay dropped nothing
        r = client.get("/internal/ingest-status", headers={"X-Internal-Token": TOKEN})
        assert r.status_code == 200 and r.json()["rows"] == rows


# -- the Prometheus port of sender / reporter / inbound -------------------------------------------

@pytest.fixture
def prometheus_port(tmp_path: Path) -> Iterator[str]:
    server = start_metrics_server(Settings(dev=False, state_dir=tmp_path, internal_token=TOKEN), 0)
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_prometheus_port_serves_only_health_without_the_token(prometheus_port: str) -> None:
    assert httpx.get(prometheus_port + "/health").json() == {"ok": True}
    good = httpx.get(prometheus_port + "/metrics", headers=auth_headers(TOKEN))
    assert good.status_code == 200 and "python_info" in good.text  # positive control
    assert httpx.get(prometheus_port + "/metrics", headers={"X-Internal-Token": TOKEN}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Internal-Token": TOKEN + "x"}):
        for path in ("/metrics", "/", "/anything"):
            r = httpx.get(prometheus_port + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == ERROR_CODE and "python_info" not in r.text


def test_prometheus_port_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(MissingInternalToken):
        start_metrics_server(Settings(dev=False, state_dir=tmp_path), 0)


# -- the API's public /metrics: snapshot and require-admin ----------------------------------------

def test_snapshot_refreshes_once_for_concurrent_scrapes_and_again_when_stale() -> None:
    from services.api.gmp_metrics import CountersSnapshot

    now = [100.0]
    fetches: list[int] = []

    async def fetch() -> dict[str, Any]:
        fetches.append(1)
        await asyncio.sleep(0.05)  # scrapes arriving meanwhile wait for this one refresh
        return {"pending": len(fetches), "accounts": []}

    async def scenario() -> None:
        snap = CountersSnapshot(5.0, clock=lambda: now[0])
        first = await asyncio.gather(*(snap.get(fetch) for _ in range(50)))
        assert [c["pending"] for c in first] == [1] * 50 and snap.refreshes == 1
        now[0] += 4.9
        assert (await snap.get(fetch))["pending"] == 1 and snap.refreshes == 1
        now[0] += 0.2
        again = await asyncio.gather(*(snap.get(fetch) for _ in range(20)))
        assert [c["pending"] for c in again] == [2] * 20 and snap.refreshes == 2

        async def down() -> None:
            fetches.append(1)
            return None

        failing = CountersSnapshot(5.0, clock=lambda: now[0])  # a failure is cached too
        assert await asyncio.gather(*(failing.get(down) for _ in range(10))) == [None] * 10
        assert failing.refreshes == 1

    asyncio.run(scenario())
    assert len(fetches) == 3


def _api(require_admin: bool, counter_calls: list[httpx.Request]) -> TestClient:
    from services.api.errors import install_error_handlers
    from services.api.routes_core import router
    from services.common.apikeys import new_api_key, pepper_from

    pepper = pepper_from("unit-pepper")
    key, key_id, key_hash = new_api_key(pepper)

    def metrics_service(request: httpx.Request) -> httpx.Response:
        counter_calls.append(request)
        return httpx.Response(200, json={"accounts": [{"tenant_id": "t1", "account_id": "main", "sent": 3}],
                                         "pending": 0})

    st = SimpleNamespace(
        settings=Settings(metrics_require_admin=require_admin, api_metrics_snapshot_s=5.0),
        admin_token="unit-admin-token", pepper=pepper,
        apikeys=SimpleNamespace(get=lambda k: {"key_hash": key_hash, "tenant_id": "t1"} if k == key_id else None),
        tenants=SimpleNamespace(get=lambda t: {"id": t} if t == "t1" else None),
        accounts=SimpleNamespace(items={"t1/main": {"tenant_id": "t1", "id": "main"}}),
        metrics=httpx.AsyncClient(base_url="http://metrics", transport=httpx.MockTransport(metrics_service),
                                  headers=auth_headers(TOKEN)),
        gmp_snapshot=None,
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.postbus = st
    client = TestClient(app)
    client.tenant_key = key  # type: ignore[attr-defined]
    return client


def test_public_metrics_by_default_served_from_one_refresh() -> None:
    calls: list[httpx.Request] = []
    client = _api(False, calls)
    texts = [client.get("/metrics") for _ in range(30)]
    assert all(r.status_code == 200 for r in texts)
    assert 'gmp_sent_total{tenant_id="t1",account_id="main"} 3.0' in texts[0].text
    assert "postbus_api_delivery_counters_refreshes_total 1.0" in texts[-1].text
    assert len(calls) == 1 and calls[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_metrics_require_admin_setting() -> None:
    calls: list[httpx.Request] = []
    client = _api(True, calls)
    r = client.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "authentication_required"
    r = client.get("/metrics", headers={"X-API-Token": client.tenant_key})  # type: ignore[attr-defined]
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = client.get("/metrics", headers={"X-API-Token": "wrong"})
    assert r.status_code == 401 and "gmp_sent_total" not in r.text
    assert calls == []  # nothing was read for the refused scrapes
    r = client.get("/metrics", headers={"Authorization": "Bearer unit-admin-token"})
    assert r.status_code == 200 and 'gmp_sent_total{tenant_id="t1",account_id="main"} 3.0' in r.text
    assert len(calls) == 1


# -- every service refuses to start outside dev mode without the token ----------------------------

@pytest.mark.parametrize("module", ["services.metrics", "services.api", "services.sender", "services.reporter",
                                    "services.inbound"])
def test_every_service_refuses_to_start_without_the_token(module: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from cryptography.fernet import Fernet

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")}
    env.update(PYTHONPATH=str(repo), POSTBUS_STATE_DIR=str(tmp_path), POSTBUS_SECRET_KEY=Fernet.generate_key().decode(),
               POSTBUS_ADMIN_TOKEN="unit-admin-token-0123456789", POSTBUS_KAFKA_BOOTSTRAP="127.0.0.1:1",
               **{f"POSTBUS_{p}_PORT": "0" for p in ("API", "METRICS", "SENDER_METRICS", "REPORTER_METRICS",
                                                     "INBOUND_METRICS", "INBOUND_SMTP")})
    res = subprocess.run([sys.executable, "-m", module], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    assert "POSTBUS_INTERNAL_TOKEN is not set" in res.stdout + res.stderr
    assert not (tmp_path / internal_auth.TOKEN_FILE).exists()
