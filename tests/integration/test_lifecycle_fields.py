"""Issue 9 §2, read as a client reads them: ``deferred_ts`` is when a deferred message will be tried
next, ``retry_count`` counts the attempts so far, history entries carry ``event_type``, and
``payload`` is the message as submitted (without secrets or attachment contents)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import FailFirst, RecordingSmtpServer


@pytest.fixture
def greylisting_smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer(replies={"grey@example.test": FailFirst(2)}) as s:
        yield s


def _listing(t: Tenant, **params: Any) -> dict[str, dict[str, Any]]:
    r = t.http.get("/messages", params=params)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["messages"]}


def test_deferred_ts_is_the_next_try_and_retry_count_counts_attempts(
        new_tenant, greylisting_smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    r = t.http.post("/account", json={"id": "grey", "host": greylisting_smtp.host, "port": greylisting_smtp.port,
                                      "use_tls": False})
    assert r.status_code == 200, r.text
    before = time.time()
    r = t.http.post("/commands/add-messages", json={"messages": [
        t.message("g-1", account_id="grey", to=["grey@example.test"])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text

    # the first attempt is refused with 451: the message is deferred until its retry
    def deferred() -> dict[str, Any] | None:
        m = _listing(t, include_history="true").get("g-1")
        return m if m and m["status"] == "deferred" and m["retry_count"] >= 1 else None

    m = wait_until(deferred, what="the message deferred after a temporary failure")
    deferrals = [h for h in m["history"] if h["event_type"] == "deferred"]
    assert deferrals and all(h["type"] == "deferred" for h in deferrals)
    # the listing and its history are two reads: a retry may land between them, so match any deferral
    assert m["deferred_ts"] > before and m["deferred_ts"] in {h["deferred_until"] for h in deferrals}, m
    assert m["retry_count"] in {h["attempt"] for h in deferrals}

    # it is sent on the third attempt: retry_count says so
    def sent() -> dict[str, Any] | None:
        m = _listing(t, include_history="true").get("g-1")
        return m if m and m["status"] == "sent" else None

    m = wait_until(sent, timeout=60, what="the message sent after two deferrals")
    assert m["retry_count"] == 3
    assert [h["event_type"] for h in m["history"]] == ["deferred", "deferred", "sent"]
    assert len(greylisting_smtp.messages) == 1


def test_payload_is_the_message_as_submitted_without_secrets(new_tenant, smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    content = base64.b64encode(b"attachment content that must not be listed").decode()
    submitted = t.message("p-1", cc=["carol@example.test"], subject="Payload", body="<b>Hi</b>",
                          content_type="html", batch_code="news", priority=1, headers={"X-Campaign": "c1"},
                          attachments=[{"filename": "a.txt", "fetch_mode": "base64", "storage_path": content}])
    r = t.http.post("/commands/add-messages", json={"messages": [submitted]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    m = _listing(t)["p-1"]  # read at once: the projection has the write
    p = m["payload"]
    assert p["id"] == "p-1" and p["from"] == submitted["from"] and p["to"] == submitted["to"]
    assert p["cc"] == ["carol@example.test"] and p["subject"] == "Payload" and p["body"] == "<b>Hi</b>"
    assert p["content_type"] == "html" and p["batch_code"] == "news" and p["priority"] == 1
    assert p["headers"] == {"X-Campaign": "c1"}
    assert p["attachments"] == [{"filename": "a.txt", "fetch_mode": "base64"}]
    assert content not in httpx.Response(200, json=m).text
