"""Issue 8, findings 3 and 10: the internal ports and the public /metrics.

- The metrics service (internal HTTP) answers nothing but ``GET /health`` without the internal
  service credential (POSTBUS_INTERNAL_TOKEN): no tenant's messages, no replay.
- The Prometheus ports of sender, reporter and inbound serve ``/health`` only without it.
- Operators replay the analytics only through the API's admin route.
- The API's public ``/metrics`` is served from a snapshot: a scrape flood costs at most one or two
  reads of the delivery counters (ClickHouse queries), counted both by the API and by the metrics
  service itself.

Runs on the session ``system`` (no particular network policy needed). Every refusal has its
positive control in the same test: the same call with the credential works."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, Tenant, internal_headers, wait_until
from tests.support.smtp_server import RecordingSmtpServer


def _bad_credentials(tenant: Tenant) -> list[dict[str, str]]:
    """Nothing, a wrong token in either header, the admin token, a tenant key, Basic auth."""
    return [
        {},
        {"Authorization": "Bearer wrong-internal-token-0123456789"},
        {"X-Internal-Token": "wrong-internal-token-0123456789"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},
        {"X-API-Token": ADMIN_TOKEN},
        {"Authorization": f"Bearer {tenant.api_key}"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
    ]


def _assert_refused(r: httpx.Response, *secrets: str) -> None:
    assert r.status_code == 401, (r.request.method, r.request.url, r.status_code, r.text[:300])
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == "internal_auth_required", body
    assert body["error"]["message"]
    for s in secrets:
        assert s not in r.text


def _log_since(system: LocalSystem, name: str, offset: int) -> str:
    with system.log_path(name).open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


def _log_size(system: LocalSystem, name: str) -> int:
    return system.log_path(name).stat().st_size


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


def _sent_and_seen(t: Tenant, metrics: httpx.Client, n: int) -> None:
    msgs = [t.message(f"ip-{i}") for i in range(n)]
    r = t.http.post("/commands/add-messages", json={"messages": msgs})
    assert r.status_code == 200 and r.json()["queued"] == n, r.text
    wait_until(lambda: metrics.get(f"/internal/tenants/{t.id}/metrics").json().get("sent") == n,
               timeout=60, what=f"{n} sent messages in the metrics projection")


@pytest.fixture
def metrics(system: LocalSystem) -> Iterator[Callable[..., httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(headers: dict[str, str] | None = None) -> httpx.Client:
        c = httpx.Client(base_url=system.url("metrics"), headers=headers or {}, timeout=30)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def test_metrics_service_answers_no_internal_route_without_the_credential(
        system: LocalSystem, new_tenant, smtp: RecordingSmtpServer, metrics) -> None:
    t: Tenant = new_tenant()
    good = metrics(internal_headers(system))
    _sent_and_seen(t, good, 2)
    # positive control: with the credential, the tenant's messages are there
    r = good.get("/internal/messages", params={"tenant_id": t.id})
    assert r.status_code == 200 and {m["id"] for m in r.json()["messages"]} == {"ip-0", "ip-1"}
    before = good.get("/metrics").text
    token = internal_headers(system)["Authorization"].split(" ", 1)[1]

    anon = metrics()
    assert anon.get("/health").status_code == 200  # bare liveness stays public
    for headers in _bad_credentials(t):
        for method, path, kw in (
            ("GET", "/internal/messages", {"params": {"tenant_id": t.id}}),
            ("GET", f"/internal/tenants/{t.id}/metrics", {}),
            ("GET", f"/internal/tenants/{t.id}/messages/ip-0/events", {}),
            ("GET", "/internal/counters", {}),
            ("POST", "/internal/sent-ids", {"json": {"tenant_id": t.id, "ids": ["ip-0"]}}),
            ("POST", "/internal/messages/lookup", {"json": {"tenant_id": t.id, "ids": ["ip-0"]}}),
            ("GET", "/internal/inbound/resolve", {"params": {"tenant_id": t.id, "id": "ip-0"}}),
            ("GET", "/internal/ingest-status", {}),
            ("GET", "/metrics", {}),
            ("GET", "/openapi.json", {}),
        ):
            r = anon.request(method, path, headers=headers, **kw)
            _assert_refused(r, t.id, "ip-0", token)
    # nothing reached a route: the metrics service's request counter did not move for them
    after = good.get("/metrics").text
    route = (("route", "/internal/messages"), ("status", "200"))
    assert _samples(after, "postbus_metrics_requests_total")[route] == \
        _samples(before, "postbus_metrics_requests_total")[route]


def test_replay_without_the_credential_drops_nothing(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer,
                                                     metrics) -> None:
    t: Tenant = new_tenant()
    good = metrics(internal_headers(system))
    _sent_and_seen(t, good, 1)
    # positive control (harmless): the ingest status with the credential
    status = good.get("/internal/ingest-status")
    assert status.status_code == 200 and status.json()["rows"] > 0
    rows = status.json()["rows"]
    offset = _log_size(system, "metrics")

    anon = metrics()
    for headers in _bad_credentials(t):
        _assert_refused(anon.post("/internal/replay", headers=headers))

    # no replay happened: the service never logged one, the rows and the tenant's counts are intact
    status = good.get("/internal/ingest-status").json()
    assert status["replaying"] is False and status["rows"] >= rows
    assert good.get(f"/internal/tenants/{t.id}/metrics").json()["sent"] == 1
    assert "replay requested" not in _log_since(system, "metrics", offset)


@pytest.mark.parametrize("name", ["sender", "reporter", "inbound"])
def test_prometheus_ports_serve_only_health_without_the_credential(system: LocalSystem, new_tenant,
                                                                   name: str) -> None:
    t: Tenant = new_tenant()
    base = system.url(name)
    assert httpx.get(base + "/health", timeout=10).json() == {"ok": True}
    # positive control: Prometheus with the bearer token gets the exposition
    r = httpx.get(base + "/metrics", headers=internal_headers(system), timeout=10)
    assert r.status_code == 200 and "python_info" in r.text
    for headers in _bad_credentials(t):
        for path in ("/metrics", "/", "/metrics?name[]=python_info"):
            r = httpx.get(base + path, headers=headers, timeout=10)
            _assert_refused(r)
            assert "python_info" not in r.text


def test_replay_through_the_api_is_admin_only(system: LocalSystem, new_tenant, smtp: RecordingSmtpServer,
                                             metrics) -> None:
    t: Tenant = new_tenant()
    good = metrics(internal_headers(system))
    _sent_and_seen(t, good, 1)
    rows = good.get("/internal/ingest-status").json()["rows"]
    offset = _log_size(system, "metrics")
    api = system.url("api") + "/admin/replay/metrics"
    confirm = {"confirm": True}

    r = httpx.post(api, json=confirm, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "authentication_required"
    r = httpx.post(api, json=confirm, headers={"X-API-Token": "pbk_0123456789abcdef_not-a-real-secret"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    internal = internal_headers(system)["Authorization"]
    r = httpx.post(api, json=confirm, headers={"Authorization": internal}, timeout=30)  # not an API credential
    assert r.status_code == 401
    r = httpx.post(api, json=confirm, headers={"X-API-Token": t.api_key}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    # the admin passes authentication (positive control of the route) but must confirm
    r = httpx.post(api, json={}, headers={"X-API-Token": ADMIN_TOKEN}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "confirmation_required"

    status = good.get("/internal/ingest-status").json()
    assert status["replaying"] is False and status["rows"] >= rows
    assert good.get(f"/internal/tenants/{t.id}/metrics").json()["sent"] == 1
    assert "replay requested" not in _log_since(system, "metrics", offset)
    # the confirmed admin replay itself, and the rebuild: integration/test_durability.py


def test_public_metrics_flood_reads_the_counters_at_most_twice(system: LocalSystem, new_tenant,
                                                              smtp: RecordingSmtpServer, metrics) -> None:
    t: Tenant = new_tenant()
    good = metrics(internal_headers(system))
    _sent_and_seen(t, good, 3)
    public = system.url("api") + "/metrics"
    labels = (("account_id", "main"), ("tenant_id", t.id))

    # the numbers are right (once the snapshot is younger than the sends)
    def right() -> str | None:
        text = httpx.get(public, timeout=10).text
        return text if _samples(text, "gmp_sent_total").get(labels) == 3.0 else None

    first = wait_until(right, timeout=30, what="the tenant's 3 sends on /metrics")

    def counter_reads() -> float:
        text = good.get("/metrics").text
        return sum(v for k, v in _samples(text, "postbus_metrics_requests_total").items()
                   if dict(k)["route"] == "/internal/counters")

    api_refreshes = _samples(first, "postbus_api_delivery_counters_refreshes_total")[()]
    service_reads = counter_reads()

    def scrape(_: int) -> str:
        r = httpx.get(public, timeout=30)
        assert r.status_code == 200
        return r.text

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        texts = list(pool.map(scrape, range(50)))
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"the flood took {elapsed:.1f}s: longer than one snapshot interval"
    assert all(_samples(x, "gmp_sent_total").get(labels) == 3.0 for x in texts)
    last = max(_samples(x, "postbus_api_delivery_counters_refreshes_total")[()] for x in texts)
    assert last - api_refreshes <= 2, (api_refreshes, last)
    # the metrics service saw as few /internal/counters queries (whatever the API reports)
    assert counter_reads() - service_reads <= 2
