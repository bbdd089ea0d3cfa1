"""Status, instance config, bounce reload and the command log (served from postbus.commands)."""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import Tenant


def test_status_and_instance_config_with_write_only_secrets(admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant()
    r = t.http.get("/status")
    assert r.status_code == 200 and r.json() == {"ok": True, "active": True}
    r = admin.get("/instance")
    assert r.status_code == 200
    inst = r.json()["instance"]
    assert r.json()["ok"] is True and inst["active"] is True
    assert inst["report_retention_seconds"] >= 0 and inst["sync_interval_seconds"] > 0

    r = admin.put("/instance", json={"name": "postbus-test", "sync_interval_seconds": 120,
                                     "bounce": {"enabled": True, "imap_host": "imap.example.test", "imap_port": 993,
                                                "imap_user": "bounces", "imap_password": "imap-s3cret",
                                                "mailbox": "INBOX"}})
    assert r.status_code == 200, r.text
    got = admin.get("/instance").json()["instance"]
    assert got["name"] == "postbus-test" and got["sync_interval_seconds"] == 120
    assert got["bounce"] == {"enabled": True, "imap_host": "imap.example.test", "imap_port": 993,
                             "imap_user": "bounces", "has_imap_password": True, "mailbox": "INBOX",
                             "poll_interval_seconds": None}
    assert "imap-s3cret" not in admin.get("/instance").text
    # partial: untouched fields keep their value, the password too
    assert admin.put("/instance", json={"report_retention_seconds": 3600}).status_code == 200
    got = admin.get("/instance").json()["instance"]
    assert got["report_retention_seconds"] == 3600 and got["name"] == "postbus-test"
    assert got["bounce"]["has_imap_password"] is True

    # the scheduler switch shows in /status for any token
    assert admin.put("/instance", json={"active": False}).status_code == 200
    try:
        assert t.http.get("/status").json() == {"ok": True, "active": False}
    finally:
        assert admin.put("/instance", json={"active": True}).status_code == 200
        # leave bounce processing off: the inbound service would keep polling the made-up host
        assert admin.put("/instance", json={"bounce": {"enabled": False, "imap_host": None}}).status_code == 200
    assert t.http.get("/status").json()["active"] is True

    assert admin.post("/instance/reload-bounce").json() == {"ok": True}
    for method, path in (("GET", "/instance"), ("PUT", "/instance"), ("POST", "/instance/reload-bounce")):
        assert t.http.request(method, path, json={} if method == "PUT" else None).status_code == 403

    # the instance commands are in the audit, with the IMAP password redacted
    r = admin.get("/command-log", params={"route": "PUT /instance", "limit": 1000})
    entries = r.json()["entries"]
    assert entries and all(e["type"] == "instance.update" for e in entries)
    assert any(e["payload"]["bounce_imap_password_enc"] == "***" for e in entries)
    assert "imap-s3cret" not in r.text
    reloads = admin.get("/command-log", params={"type": "bounce.reload"}).json()["entries"]
    assert reloads and reloads[-1]["route"] == "POST /instance/reload-bounce"


def test_command_log_entries_filters_and_paging(admin: httpx.Client, new_tenant) -> None:
    t0 = time.time()
    t: Tenant = new_tenant()
    for i in range(5):
        r = t.http.post("/account", json={"id": f"acc-{i}", "host": "smtp.example.test", "password": f"pw-{i}"})
        assert r.status_code == 200
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("cl-1")]})
    assert r.status_code == 200

    r = admin.get("/command-log", params={"tenant_id": t.id, "limit": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    entries = body["entries"]
    assert body["ok"] is True and body["count"] == len(entries) and body["next_cursor"] is None
    assert [e["type"] for e in entries][:7] == ["tenant.create"] + ["account.upsert"] * 6
    assert all(e["tenant_id"] == t.id and e["outcome"] == "accepted" for e in entries)
    create = entries[0]
    assert create["actor"] == "admin" and create["route"] == "POST /tenant" and create["payload"]["id"] == t.id
    assert create["payload"]["client_auth_secret_enc"] == "***"
    accounts = [e for e in entries if e["type"] == "account.upsert"]
    assert accounts[-1]["actor"].startswith(f"tenant:{t.id}/") and accounts[-1]["payload"]["password_enc"] == "***"
    assert "pw-4" not in r.text and "s3cret" not in r.text
    assert any(e["type"] == "messages.add" or e["payload_schema"] == "AddMessages" for e in entries)
    ts = [e["ts"] for e in entries]
    assert ts == sorted(ts) and ts[0] >= int(t0 * 1000) - 1000

    # paging: three pages of 3 then the rest, no duplicates, same order
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"tenant_id": t.id, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/command-log", params=params).json()
        seen += [e["command_id"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [e["command_id"] for e in entries]

    # route and time filters
    only = admin.get("/command-log", params={"tenant_id": t.id, "route": "/account"}).json()["entries"]
    assert len(only) == 6 and {e["route"] for e in only} == {"POST /account"}
    mid = entries[3]["ts"]
    window = admin.get("/command-log", params={"tenant_id": t.id, "since": mid, "until": mid}).json()
    assert window["entries"] and all(e["ts"] == mid for e in window["entries"])
    later = admin.get("/command-log", params={"tenant_id": t.id, "since": mid}).json()["entries"]
    assert [e["command_id"] for e in later] == [e["command_id"] for e in entries if e["ts"] >= mid]
    # without a tenant filter the admin sees every tenant's commands, merged by time
    all_ = admin.get("/command-log", params={"since": t0, "limit": 1000}).json()["entries"]
    assert {e["command_id"] for e in entries} <= {e["command_id"] for e in all_}

    bad = admin.get("/command-log", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    assert admin.get("/command-log", params={"limit": 0}).status_code == 422
    assert t.http.get("/command-log").status_code == 403


def test_command_log_export_is_ndjson_in_order_and_redacted(admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/account", json={"id": "x", "host": "smtp.example.test", "password": "exp0rt-pw"})
    assert r.status_code == 200
    assert t.http.put(f"/tenant/{t.id}", json={"client_auth": {"method": "basic", "user": "u",
                                                                "password": "basic-pw"}}).status_code == 200
    with admin.stream("GET", "/command-log/export", params={"tenant_id": t.id}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        text = "".join(r.iter_text())
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["type"] for x in lines] == ["tenant.create", "account.upsert", "account.upsert", "tenant.update"]
    assert "exp0rt-pw" not in text and "basic-pw" not in text and "s3cret" not in text
    for line in lines:
        assert {"command_id", "ts", "type", "tenant_id", "actor", "route", "payload_schema", "payload"} <= set(line)
    assert lines[-1]["payload_schema"] == "Tenant" and lines[-1]["payload"]["client_auth_secret_enc"] == "***"
    # the same commands as the paged API, in the same order
    paged = admin.get("/command-log", params={"tenant_id": t.id}).json()["entries"]
    assert [x["command_id"] for x in lines] == [e["command_id"] for e in paged]
    assert admin.get("/command-log/export", params={"tenant_id": "nobody-" + t.id}).text == ""
    assert t.http.get("/command-log/export").status_code == 403
