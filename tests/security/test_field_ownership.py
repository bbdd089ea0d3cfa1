"""Finding 6: a tenant key edited operator fields of its own tenant (``rate_limits``, ``active``,
``large_file_config.storage_url``) and of its outbound domain (status, limits, tier, enforcement), so it
could lift the automatic 3 % suspension and its own quotas.

One table (services/api/field_policy.py) says who writes what; an admin-only field in a tenant-key
request is 403 ``admin_only_field`` naming the field(s), and nothing is written: the value read back at
once is unchanged and no command is appended. The admin can set each of them (control), and the
tenant-writable fields still work."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant

TENANT_ATTACKS: list[tuple[dict[str, Any], list[str]]] = [
    ({"rate_limits": {"hourly": 1_000_000, "daily": 10_000_000}}, ["rate_limits"]),
    ({"rate_limits": None}, ["rate_limits"]),  # null = unlimited
    ({"active": False}, ["active"]),
    ({"active": True}, ["active"]),
    ({"large_file_config": {"storage_url": "file:///srv"}}, ["large_file_config.storage_url"]),
    ({"name": "ok", "rate_limits": {"hourly": 5}, "active": True}, ["active", "rate_limits"]),  # all or nothing
]

DOMAIN_ATTACKS: list[dict[str, Any]] = [
    {"outbound_status": "active"}, {"outbound_status": "suspended"}, {"outbound_daily_limit": 0},
    {"outbound_monthly_limit": 0}, {"outbound_tier": "dedicated"}, {"outbound_enforcement": "soft"},
    {"outbound_daily_limit": None},
]


def _log_count(admin: httpx.Client, tenant_id: str) -> int:
    r = admin.get("/command-log", params={"tenant_id": tenant_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


def _refused(r: httpx.Response, fields: list[str]) -> None:
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == "admin_only_field", r.text
    assert sorted(body["error"]["details"]["fields"]) == sorted(fields), r.text
    assert all(f in body["error"]["message"] for f in fields)


@pytest.mark.parametrize(("body", "fields"), TENANT_ATTACKS)
def test_admin_only_tenant_fields_from_a_tenant_key(secure_system: LocalSystem, secure_admin: httpx.Client,
                                                    secure_tenant: Callable[..., Tenant], body: dict[str, Any],
                                                    fields: list[str]) -> None:
    t = secure_tenant(rate_limits={"hourly": 10, "daily": 100},
                      large_file_config={"storage_url": f"file://{secure_system.state_dir}/files/x"})
    before = t.http.get(f"/tenant/{t.id}").json()
    count = _log_count(secure_admin, t.id)
    _refused(t.http.put(f"/tenant/{t.id}", json=body), fields)
    assert t.http.get(f"/tenant/{t.id}").json() == before  # read back at once: unchanged
    assert _log_count(secure_admin, t.id) == count  # no command appended
    # control: the admin sets the same body
    body = {**body, "large_file_config": {"storage_url": f"file://{secure_system.state_dir}/files/y"}} \
        if "large_file_config" in body else body
    assert secure_admin.put(f"/tenant/{t.id}", json=body).status_code == 200
    after = secure_admin.get(f"/tenant/{t.id}").json()
    if "rate_limits" in body:
        assert after["rate_limits"] == {"hourly": None, "daily": None, **(body["rate_limits"] or {})}
    if "active" in body:
        assert after["active"] is body["active"]
    if "large_file_config" in body:
        assert after["large_file_config"] == body["large_file_config"]
    assert _log_count(secure_admin, t.id) == count + 1


def test_tenant_writable_fields_still_work(secure_admin: httpx.Client, secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant(rate_limits={"hourly": 10, "daily": 100})
    body = {"name": "Renamed", "client_sync_path": "/hooks/sync", "client_attachment_path": "/hooks/files",
            "client_auth": {"method": "bearer", "token": "s3cret"}, "tracking": {"opens": True},
            "large_file_config": {"enabled": True, "max_size_mb": 3, "action": "reject", "storage_root": "shared"}}
    r = t.http.put(f"/tenant/{t.id}", json=body)
    assert r.status_code == 200, r.text
    got = t.http.get(f"/tenant/{t.id}").json()
    assert (got["name"], got["client_sync_path"], got["client_attachment_path"]) == (
        "Renamed", "/hooks/sync", "/hooks/files")
    assert got["tracking"]["opens"] is True and got["large_file_config"] == body["large_file_config"]
    assert got["rate_limits"] == {"hourly": 10, "daily": 100} and got["active"] is True


def _domain() -> str:
    return f"d{uuid.uuid4().hex[:10]}.example.test"


def test_admin_only_domain_fields_from_a_tenant_key(secure_admin: httpx.Client,
                                                    secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    name = _domain()
    # the tenant registers its domain (empty body, or naming itself): tenant-writable
    r = t.http.put(f"/domains/{name}/outbound", json={"tenant_id": t.id})
    assert r.status_code == 200, r.text
    # the operator suspends it and sets its quotas
    r = secure_admin.put(f"/domains/{name}/outbound", json={
        "outbound_status": "suspended", "outbound_daily_limit": 5, "outbound_monthly_limit": 50,
        "outbound_tier": "shared", "outbound_enforcement": "hard"})
    assert r.status_code == 200, r.text
    before = t.http.get(f"/domains/{name}/outbound").json()
    assert before["outbound_status"] == "suspended"
    count = _log_count(secure_admin, t.id)
    for body in DOMAIN_ATTACKS:
        _refused(t.http.put(f"/domains/{name}/outbound", json=body), list(body))
        assert t.http.get(f"/domains/{name}/outbound").json() == before, body
    # a new domain cannot be registered with operator values either
    other = _domain()
    _refused(t.http.put(f"/domains/{other}/outbound", json={"outbound_daily_limit": 0, "outbound_tier": "dedicated"}),
             ["outbound_daily_limit", "outbound_tier"])
    assert t.http.get(f"/domains/{other}/outbound").status_code == 404
    assert _log_count(secure_admin, t.id) == count  # nothing appended
    # control: the admin lifts the suspension and the quota
    r = secure_admin.put(f"/domains/{name}/outbound", json={"outbound_status": "active", "outbound_daily_limit": 0})
    assert r.status_code == 200 and r.json()["outbound_status"] == "active" and r.json()["outbound_daily_limit"] == 0
    assert t.http.get(f"/domains/{name}/outbound").json()["outbound_status"] == "active"
