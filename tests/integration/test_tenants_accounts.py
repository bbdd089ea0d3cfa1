"""Tenants, API keys and accounts over HTTP against the running system (mail-proxy seed shapes)."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.conftest import Tenant


def _client(system, key: str) -> httpx.Client:
    return httpx.Client(base_url=system.url("api"), headers={"X-API-Token": key}, timeout=30)


def test_tenant_list_get_and_partial_update_keep_the_key(system, admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant(rate_limits={"hourly": 100, "daily": 1000},
                           large_file_config={"enabled": True, "max_size_mb": 5, "action": "warn"})
    r = admin.get("/tenants")
    assert r.status_code == 200 and r.json()["ok"] is True
    listed = {x["id"]: x for x in r.json()["tenants"]}
    got = listed[t.id]
    assert got["name"] == f"Tenant {t.id}" and got["active"] is True
    assert got["client_base_url"] == t.client.url.rstrip("/")
    assert got["created_at"].endswith("Z") and "T" in got["created_at"]
    assert got["client_auth"] == {"method": "bearer", "user": None, "has_secret": True}
    assert got["rate_limits"] == {"hourly": 100, "daily": 1000}
    assert got["large_file_config"]["max_size_mb"] == 5
    assert "s3cret" not in r.text  # the client token never comes back

    # a tenant reads itself; the admin reads anyone
    assert t.http.get(f"/tenant/{t.id}").json() == got
    assert admin.get(f"/tenant/{t.id}").json()["id"] == t.id

    r = t.http.put(f"/tenant/{t.id}", json={"name": "Renamed", "client_sync_path": "/hooks/sync"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    after = t.http.get(f"/tenant/{t.id}").json()
    assert after["name"] == "Renamed" and after["client_sync_path"] == "/hooks/sync"
    assert after["rate_limits"] == {"hourly": 100, "daily": 1000}  # untouched fields keep their value
    assert after["client_auth"]["has_secret"] is True and after["created_at"] == got["created_at"]
    # the API key still works after the update
    assert t.http.get("/accounts").status_code == 200

    # active_only filter (active is an admin-only field: services/api/field_policy.py)
    r = t.http.put(f"/tenant/{t.id}", json={"active": False})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only_field", r.text
    assert admin.put(f"/tenant/{t.id}", json={"active": False}).status_code == 200
    assert t.id not in {x["id"] for x in admin.get("/tenants", params={"active_only": True}).json()["tenants"]}
    assert t.id in {x["id"] for x in admin.get("/tenants", params={"active_only": False}).json()["tenants"]}


def test_unknown_tenant_is_404_and_other_tenants_are_refused(admin: httpx.Client, new_tenant) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    for method in ("GET", "PUT", "DELETE"):
        r = admin.request(method, "/tenant/does-not-exist", json={} if method == "PUT" else None)
        assert r.status_code == 404, (method, r.text)
        assert r.json() == {"ok": False, "error": {"code": "tenant_not_found", "message": r.json()["error"]["message"]}}
    assert admin.post("/tenant/does-not-exist/api-key").status_code == 404
    assert admin.delete("/tenant/does-not-exist/api-key").status_code == 404
    r = a.http.get(f"/tenant/{b.id}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "tenant_mismatch"
    assert a.http.put(f"/tenant/{b.id}", json={"name": "pwned"}).status_code == 401
    assert admin.get(f"/tenant/{b.id}").json()["name"] == f"Tenant {b.id}"
    # admin-only routes answer 403 to a tenant key
    assert a.http.get("/tenants").status_code == 403
    assert a.http.delete(f"/tenant/{a.id}").status_code == 403
    assert a.http.post(f"/tenant/{a.id}/api-key").status_code == 403


def test_rotate_kills_the_old_key_at_once_and_revoke_kills_all(system, admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant()
    r = admin.post(f"/tenant/{t.id}/api-key")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["api_key"].startswith("pbk_") and body["api_key"] != t.api_key
    old = t.http.get(f"/tenant/{t.id}")
    assert old.status_code == 401 and old.json()["error"]["code"] == "invalid_token"
    with _client(system, body["api_key"]) as new:
        assert new.get(f"/tenant/{t.id}").status_code == 200
        assert admin.delete(f"/tenant/{t.id}/api-key").json() == {"ok": True}
        assert new.get(f"/tenant/{t.id}").status_code == 401
    # the tenant itself is untouched and can get a fresh key
    assert admin.get(f"/tenant/{t.id}").status_code == 200
    with _client(system, admin.post(f"/tenant/{t.id}/api-key").json()["api_key"]) as fresh:
        assert fresh.get("/status").json()["ok"] is True


def test_key_expiry_on_create_and_rotate(system, admin: httpx.Client) -> None:
    tid = "exp-" + uuid.uuid4().hex[:8]
    r = admin.post("/tenant", json={"id": tid, "expires_at": int(time.time()) + 2})
    assert r.status_code == 200, r.text
    with _client(system, r.json()["api_key"]) as c:
        assert c.get(f"/tenant/{tid}").status_code == 200
        time.sleep(2.2)
        r2 = c.get(f"/tenant/{tid}")
        assert r2.status_code == 401 and r2.json()["error"]["code"] == "api_key_expired"
    r = admin.post(f"/tenant/{tid}/api-key", json={"expires_in_days": 30})
    assert r.status_code == 200
    assert abs(r.json()["expires_at"] - (time.time() + 30 * 86400)) < 60
    with _client(system, r.json()["api_key"]) as c:
        assert c.get(f"/tenant/{tid}").status_code == 200
    past = admin.post(f"/tenant/{tid}/api-key", json={"expires_at": 1000})
    assert past.status_code == 400 and past.json()["error"]["code"] == "invalid_expiry"
    both = admin.post("/tenant", json={"id": "x" + tid, "expires_at": 4102444800, "expires_in_days": 1})
    assert both.status_code == 400


def test_delete_tenant_removes_keys_and_accounts(system, admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant()
    assert admin.get("/accounts", params={"tenant_id": t.id}).json()["accounts"]
    r = admin.delete(f"/tenant/{t.id}")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert admin.get(f"/tenant/{t.id}").status_code == 404
    assert t.id not in {x["id"] for x in admin.get("/tenants").json()["tenants"]}
    assert t.http.get("/status").status_code == 401  # its key died with it
    assert admin.get("/accounts", params={"tenant_id": t.id}).status_code == 404
    # re-creating the id starts clean: no old accounts
    r = admin.post("/tenant", json={"id": t.id})
    assert r.status_code == 200 and r.json()["created"] is True
    assert admin.get("/accounts", params={"tenant_id": t.id}).json()["accounts"] == []
    r = admin.get("/command-log", params={"tenant_id": t.id, "limit": 1000})
    assert r.status_code == 200, r.text
    types = [e["type"] for e in r.json()["entries"]]
    assert "tenant.delete" in types


def test_accounts_list_without_passwords_and_delete(admin: httpx.Client, new_tenant, smtp) -> None:
    a: Tenant = new_tenant()
    b: Tenant = new_tenant()
    r = a.http.post("/account", json={"id": "second", "host": "smtp.example.test", "port": 2525,
                                      "user": "u", "password": "hunter2", "limit_per_hour": 50})
    assert r.status_code == 200, r.text
    r = a.http.get("/accounts")
    assert r.status_code == 200 and r.json()["ok"] is True
    accounts = {x["id"]: x for x in r.json()["accounts"]}
    assert set(accounts) == {"main", "second"}
    second = accounts["second"]
    assert second["has_password"] is True and accounts["main"]["has_password"] is False
    assert second["tenant_id"] == a.id and second["port"] == 2525 and second["limit_per_hour"] == 50
    assert "password" not in second and "password_enc" not in second and "hunter2" not in r.text
    assert a.http.get("/accounts", params={"tenant_id": a.id}).json() == r.json()
    # the admin names the tenant; without one it is a 400
    assert admin.get("/accounts", params={"tenant_id": a.id}).json() == r.json()
    r = admin.get("/accounts")
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_tenant_id"
    # another tenant: 401 when named, 404 when the account simply is not its own
    assert a.http.get("/accounts", params={"tenant_id": b.id}).status_code == 401
    r = b.http.delete("/account/second")
    assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    assert b.http.delete("/account/second", params={"tenant_id": a.id}).status_code == 401
    # delete
    assert a.http.delete("/account/second").json() == {"ok": True}
    assert [x["id"] for x in a.http.get("/accounts").json()["accounts"]] == ["main"]
    assert a.http.delete("/account/second").status_code == 404
    assert admin.delete("/account/main", params={"tenant_id": a.id}).json() == {"ok": True}
    assert a.http.get("/accounts").json()["accounts"] == []
    assert admin.delete("/account/main").status_code == 400
