"""Issue 9 §4, genro-mail-proxy 0.6 clients pointed at Postbus: add-messages answers and the command
log read as genro's do (written as such a client: write, then read at once)."""

from __future__ import annotations

import time

import httpx

from tests.conftest import Tenant, wait_until


def test_an_all_invalid_batch_is_400_with_the_reasons_under_detail(new_tenant) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/commands/add-messages", json={"messages": [
        {"id": "bad-1", "account_id": t.account_id, "from": "not an address", "to": ["bob@example.test"],
         "subject": "s", "body": "b"},
        {"account_id": t.account_id, "from": "a@x.test", "to": ["bob@example.test"], "subject": "s", "body": "b"}]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["ok"] is False and body["queued"] == 0 and body["error"]["code"] == "all_rejected"
    assert body["detail"]["rejected"] == body["rejected"] and [x["id"] for x in body["rejected"]] == ["bad-1", None]
    assert all(x["reason"] for x in body["rejected"])
    # control: one valid message in the same shape of call is queued (200)
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("good-1")]})
    assert r.status_code == 200 and r.json()["queued"] == 1


def test_resending_a_sent_batch_is_an_idempotent_retry(new_tenant) -> None:
    t: Tenant = new_tenant()
    batch = [t.message("once-1"), t.message("once-2")]
    assert t.http.post("/commands/add-messages", json={"messages": batch}).json()["queued"] == 2
    t.client.wait_for_reports(lambda reps: {r["id"] for r in reps if r.get("sent_ts")} >= {"once-1", "once-2"})
    r = t.http.post("/commands/add-messages", json={"messages": batch})  # the client's retry, at once
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "queued": 0, "rejected": [
        {"id": "once-1", "reason": "already sent", "code": "already_sent"},
        {"id": "once-2", "reason": "already sent", "code": "already_sent"}]}
    # one new message among sent ones is queued, the sent ones are listed as refused
    r = t.http.post("/commands/add-messages", json={"messages": [*batch, t.message("once-3")]})
    assert r.status_code == 200 and r.json()["queued"] == 1 and len(r.json()["rejected"]) == 2


def test_command_log_answers_with_genros_names_and_since_ts(admin: httpx.Client, new_tenant) -> None:
    t: Tenant = new_tenant()
    since = time.time() - 1
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("log-1")]}).status_code == 200
    r = admin.get("/command-log", params={"tenant_id": t.id, "since_ts": since, "type": "messages.add"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["commands"]) == len(body["entries"]) == 1
    cmd, entry = body["commands"][0], body["entries"][0]
    assert cmd["id"] == entry["command_id"] and cmd["command_ts"] == entry["ts"] / 1000
    assert cmd["response_status"] == 200 and cmd["endpoint"] == "POST /commands/add-messages"
    assert cmd["tenant_id"] == t.id and cmd["payload"]["messages"][0]["id"] == "log-1"
    # since_ts filters like since: nothing of this tenant after now
    later = wait_until(lambda: time.time() > since + 2, timeout=5) and time.time()
    r = admin.get("/command-log", params={"tenant_id": t.id, "since_ts": later, "type": "messages.add"})
    assert r.status_code == 200 and r.json()["commands"] == []
