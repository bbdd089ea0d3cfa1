"""Tenant SMTP API (seed: tenant-smtp-rest-api-contract.md): config, status, metrics, auth, audit."""

from __future__ import annotations

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import SUPPORT_NARROW_TOKEN, SUPPORT_TOKEN, Tenant, wait_until
from tests.integration.test_durability import _all_topic_bytes


def _get(system: LocalSystem, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{system.url('api')}{path}", headers=headers, timeout=30)


def test_status_and_config_for_own_tenant(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/account", json={"id": "limited", "host": "127.0.0.1", "port": 2525,
                                      "limit_per_minute": 60, "limit_per_hour": 1000})
    assert r.status_code == 200
    msgs = [t.message(f"s-{i}") for i in range(3)] + [t.message("s-bad", to=["reject@example.test"])]
    assert t.http.post("/commands/add-messages", json={"messages": msgs}).json()["queued"] == 4

    def status() -> dict:
        r = _get(system, f"/api/v1/tenants/{t.id}/smtp/status", t.api_key)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        return r.json()["data"]

    data = wait_until(lambda: (d := status()) and _get(system, f"/api/v1/tenants/{t.id}/smtp/metrics",
                                                       t.api_key).json()["data"]["sent"] == 3 and d,
                      what="three sends counted")
    assert data["sending_enabled"] is True
    assert data["reputation_band"] == "healthy"
    assert data["recent_bounce_rate"] == 0 and data["recent_complaint_rate"] == 0
    assert data["enforcement"] == {"throttled": False, "notes": None}

    r = _get(system, f"/api/v1/tenants/{t.id}/smtp/config", t.api_key)
    assert r.status_code == 200
    cfg = r.json()["data"]
    assert cfg["tenant_id"] == t.id
    assert cfg["from_domains"] == []
    # one unlimited account (the fixture's "main") makes the tenant-wide limits unlimited
    assert cfg["rate_limits"] == {"max_per_minute": None, "max_per_hour": None}
    assert "password" not in r.text


def test_errors_use_the_seed_codes(system: LocalSystem, new_tenant) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    for path in ("config", "status", "metrics"):
        r = _get(system, f"/api/v1/tenants/{b.id}/smtp/{path}", a.api_key)
        assert r.status_code == 403 and r.json()["error"]["code"] == "INSUFFICIENT_PERMISSIONS"
        r = _get(system, f"/api/v1/tenants/{a.id}/smtp/{path}", None)
        assert r.status_code == 401 and r.json() == {"success": False, "error": {
            "code": "AUTHENTICATION_REQUIRED", "message": r.json()["error"]["message"]}}
        r = _get(system, f"/api/v1/tenants/nope-{a.id}/smtp/{path}", system.admin_token)
        assert r.status_code == 404 and r.json()["error"]["code"] == "RESOURCE_NOT_FOUND"
    r = _get(system, f"/api/v1/tenants/{a.id}/smtp/metrics?window=forever", a.api_key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR"


def test_support_principals_need_scopes_and_are_audited(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    r = _get(system, f"/api/v1/tenants/{t.id}/smtp/metrics?window=7d", SUPPORT_TOKEN)
    assert r.status_code == 200 and r.json()["data"]["window"] == "7d"
    assert _get(system, f"/api/v1/tenants/{t.id}/smtp/config", SUPPORT_TOKEN).status_code == 200
    # smtp:read alone does not open the tenant's configuration
    r = _get(system, f"/api/v1/tenants/{t.id}/smtp/config", SUPPORT_NARROW_TOKEN)
    assert r.status_code == 403 and r.json()["error"]["code"] == "INSUFFICIENT_PERMISSIONS"
    assert _get(system, f"/api/v1/tenants/{t.id}/smtp/status", SUPPORT_NARROW_TOKEN).status_code == 200
    # support tokens are not tenant or admin tokens anywhere else
    r = httpx.post(f"{system.url('api')}/commands/run-now", headers={"X-API-Token": SUPPORT_TOKEN})
    assert r.status_code == 401
    # every support access is in the audit log (the command topic), with the principal
    data = _all_topic_bytes(system.kafka_bootstrap)
    assert b"support.access" in data and b"support:alice" in data and b"support:bob" in data
    assert SUPPORT_TOKEN.encode() not in data
