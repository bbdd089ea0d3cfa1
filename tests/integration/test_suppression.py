"""Suppression list: CRUD and tenant isolation; one-click unsubscribe (RFC 8058) suppresses the
address and a later message to it is refused with a clear reason at the client app."""

from __future__ import annotations

import re

import httpx

from tests.conftest import wait_until


def test_suppression_crud_and_isolation(new_tenant) -> None:
    a, b = new_tenant(), new_tenant()
    r = a.http.post("/suppressions", json={"addresses": ["Zed@Example.test", "amy@example.test"]})
    assert r.status_code == 200 and r.json() == {"ok": True, "added": 2, "already": 0}, r.text
    r = a.http.post("/suppressions", json={"addresses": ["amy@example.test"], "reason": "complaint"})
    assert r.json() == {"ok": True, "added": 0, "already": 1}
    page = a.http.get("/suppressions", params={"limit": 1}).json()
    assert page["total"] == 2 and [s["address"] for s in page["suppressions"]] == ["amy@example.test"]
    assert page["suppressions"][0]["reason"] == "manual" and page["next_cursor"] == "amy@example.test"
    page2 = a.http.get("/suppressions", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [s["address"] for s in page2["suppressions"]] == ["zed@example.test"] and page2["next_cursor"] is None
    # another tenant sees nothing of it and cannot touch it
    assert b.http.get("/suppressions").json()["suppressions"] == []
    assert b.http.get("/suppressions", params={"tenant_id": a.id}).status_code == 401
    assert b.http.delete("/suppressions/amy@example.test", params={"tenant_id": a.id}).status_code == 401
    assert b.http.delete("/suppressions/amy@example.test").status_code == 404
    # validation
    r = a.http.post("/suppressions", json={"addresses": ["not-an-address"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_address"
    assert a.http.post("/suppressions", json={"addresses": []}).status_code == 422
    # removal
    assert a.http.delete("/suppressions/AMY@example.test").json() == {"ok": True}
    assert a.http.delete("/suppressions/amy@example.test").status_code == 404
    assert [s["address"] for s in a.http.get("/suppressions").json()["suppressions"]] == ["zed@example.test"]


def test_one_click_unsubscribe_suppresses_and_later_mail_is_refused(new_tenant, smtp, system) -> None:
    t = new_tenant(tracking={"unsubscribe": True})
    rcpt = f"reader-{t.id}@example.test"
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("u-1", to=[rcpt])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    mail = wait_until(lambda: next(iter(smtp.messages_to(rcpt)), None), timeout=60, what="first mail").message
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = re.search(r"<(https?://[^>]+/u/[^>]+)>", str(mail["List-Unsubscribe"])).group(1)
    assert url.startswith(system.url("api"))
    with httpx.Client(timeout=30) as anon:
        page = anon.get(url)
        assert page.status_code == 200 and "<form" in page.text and rcpt in page.text
        assert t.http.get("/suppressions").json()["suppressions"] == []  # a GET does not unsubscribe
        r = anon.post(url, content=b"List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
        assert anon.post(url[:-3] + "AAA").status_code == 404  # altered token
    entries = t.http.get("/suppressions").json()["suppressions"]
    assert [(s["address"], s["reason"], s["source"]) for s in entries] == [(rcpt, "unsubscribe", "one-click")]

    # a later message to that address is refused; a message to it and another goes to the other only
    other = f"other-{t.id}@example.test"
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("u-2", to=[rcpt]),
                                                                 t.message("u-3", to=[rcpt, other])]})
    assert r.status_code == 200 and r.json()["queued"] == 2, r.text

    def final() -> dict:
        return {x["id"]: x for x in t.client.reports() if "sent_ts" in x or "error_ts" in x}

    reports = wait_until(lambda: {"u-2", "u-3"} <= set(f := final()) and f, timeout=60, what="reports")
    assert "error_ts" in reports["u-2"]
    assert reports["u-2"]["error"] == f"suppressed: unsubscribe ({rcpt})"
    assert "sent_ts" in reports["u-3"]
    got = wait_until(lambda: smtp.messages_to(other), timeout=30, what="mail to the other recipient")
    assert [m.rcpt_tos for m in got] == [[other]]
    assert len(smtp.messages_to(rcpt)) == 1  # only the first, before the unsubscribe

