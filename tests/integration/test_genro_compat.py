"""Drop-in for genro-mail-proxy 0.6 clients (issue 9 §4), tested as such a client uses the API: over
HTTP, reading at once after each write; the only waits are bounded waits for a delivery or a report,
each with a positive control.

- account limits of 0 or a negative number are accepted, stored as given and mean unlimited (a
  control account with limit_per_minute=1 defers);
- attachments: the MIME type comes from the file name when ``mime_type`` is absent, a
  ``{MD5:<hex>}`` marker in ``filename`` is the cache key and leaves the sent name, an invalid
  ``content_md5`` is refused at the API, a failed fetch names the attachment, an endpoint answering
  5xx fails the message after the retries, naming it;
- standard headers in ``headers`` override the defaults (Reply-To), a null header is dropped; the
  Postbus correlation headers, the MIME structure and CR/LF stay refused; a From given in headers
  passes the same domain checks as the field;
- ``batch_size: 1`` sends an account's mail one at a time in priority + FIFO order."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import ReceivedMessage, RecordingSmtpServer
from tests.support.static_server import StaticServer

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 3


def _queue(t: Tenant, *messages: dict[str, Any]) -> httpx.Response:
    return t.http.post("/commands/add-messages", json={"messages": list(messages)})


def _queued(t: Tenant, *messages: dict[str, Any]) -> None:
    r = _queue(t, *messages)
    assert r.status_code == 200 and r.json()["queued"] == len(messages), r.text


def _final(t: Tenant, mid: str, timeout: float = 60) -> dict[str, Any]:
    return t.client.wait_for_report(lambda r: r.get("id") == mid and ("sent_ts" in r or "error_ts" in r), timeout)


def _mail(smtp: RecordingSmtpServer, t: Tenant, mid: str) -> ReceivedMessage | None:
    for m in smtp.messages:
        if m.message["X-Postbus-Tenant"] == t.id and m.message["X-Postbus-Message-Id"] == mid:
            return m
    return None


def _wait_mail(smtp: RecordingSmtpServer, t: Tenant, mid: str, timeout: float = 60) -> ReceivedMessage:
    return wait_until(lambda: _mail(smtp, t, mid), timeout=timeout, what=f"mail {mid}")


def _listed(t: Tenant, **params: Any) -> dict[str, dict[str, Any]]:
    r = t.http.get("/messages", params=params)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["messages"]}


# --- account limits ---------------------------------------------------------------------------------

def test_limits_of_zero_or_less_are_accepted_and_unlimited(new_tenant: Callable[..., Tenant],
                                                           smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    base = {"host": smtp.host, "port": smtp.port, "use_tls": False}
    accounts = {
        "zero": {"limit_per_minute": 0, "limit_per_hour": 0, "limit_per_day": 0},
        "neg": {"limit_per_minute": -1, "limit_per_hour": -1, "limit_per_day": -5},
        # the control: a real limit (the day window too, so no minute boundary can slip both through)
        "ctl": {"limit_per_minute": 1, "limit_per_day": 1},
    }
    for aid, limits in accounts.items():
        r = t.http.post("/account", json={"id": aid, **base, **limits})
        assert r.status_code == 200, r.text
    listed = {a["id"]: a for a in t.http.get("/accounts").json()["accounts"]}  # read at once: what was stored
    for aid, limits in accounts.items():
        assert {k: listed[aid][k] for k in limits} == limits, listed[aid]

    unlimited = [t.message(f"{aid}-{i}", account_id=aid) for aid in ("zero", "neg") for i in range(4)]
    _queued(t, t.message("ctl-0", account_id="ctl"), t.message("ctl-1", account_id="ctl"), *unlimited)
    # positive control: the limited account sends one and defers the other for the rate limit
    wait_until(lambda: any(r.get("deferred_reason") == "rate_limit"
                           for mid in ("ctl-0", "ctl-1") for r in t.client.reports_for(mid)),
               timeout=60, what="the control account's rate-limit deferral")
    finals = {m["id"]: _final(t, m["id"]) for m in unlimited}
    assert all("sent_ts" in f for f in finals.values()), finals
    for m in unlimited:
        assert not [r for r in t.client.reports_for(m["id"]) if "deferred_ts" in r], t.client.reports_for(m["id"])
        assert _mail(smtp, t, m["id"]) is not None
    assert sum(_mail(smtp, t, mid) is not None for mid in ("ctl-0", "ctl-1")) == 1


# --- attachments ------------------------------------------------------------------------------------

@pytest.fixture
def static() -> Iterator[StaticServer]:
    with StaticServer({"/report.pdf": PDF}) as srv:
        yield srv


def test_mime_type_from_the_name_and_md5_marker(new_tenant: Callable[..., Tenant],
                                                 smtp: RecordingSmtpServer) -> None:
    t = new_tenant(client_attachment_path="/attachments")
    t.client.files = {"doc=7": PDF}  # answered as application/octet-stream
    md5 = hashlib.md5(PDF).hexdigest()
    marked = {"filename": f"report_{{MD5:{md5}}}.pdf", "storage_path": "doc=7"}
    _queued(t, t.message("pdf-1", attachments=[marked]))
    assert "sent_ts" in _final(t, "pdf-1"), t.client.reports_for("pdf-1")
    [part] = list(_wait_mail(smtp, t, "pdf-1").message.iter_attachments())
    assert part.get_filename() == "report.pdf"  # the marker left the name
    assert part.get_content_type() == "application/pdf"  # no mime_type given: from the name
    assert part.get_payload(decode=True) == PDF
    fetches = [r for r in t.client.requests if r.path == "/attachments"]
    assert len(fetches) == 1

    # the marker is the cache key: the same marker on a source the endpoint does not know is served
    # from the tenant's cache; the control (no marker, same unknown source) fails naming the file
    gone = {"filename": f"again_{{MD5:{md5}}}.pdf", "storage_path": "doc=unknown"}
    control = {"filename": "nomarker.pdf", "storage_path": "doc=unknown"}
    _queued(t, t.message("pdf-2", attachments=[gone]), t.message("pdf-3", attachments=[control]))
    assert "sent_ts" in _final(t, "pdf-2"), t.client.reports_for("pdf-2")
    [part] = list(_wait_mail(smtp, t, "pdf-2").message.iter_attachments())
    assert (part.get_filename(), part.get_payload(decode=True)) == ("again.pdf", PDF)
    failed = _final(t, "pdf-3")
    assert failed["error"].startswith("Attachment fetch failed for nomarker.pdf: ") and "404" in failed["error"], failed
    assert _mail(smtp, t, "pdf-3") is None
    assert [r.json for r in t.client.requests if r.path == "/attachments"][1:] == [{"storage_path": "doc=unknown"}]


def test_invalid_content_md5_is_refused_at_the_api(new_tenant: Callable[..., Tenant],
                                                     smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    good = {"filename": "a.txt", "storage_path": "base64:YQ==", "content_md5": hashlib.md5(b"a").hexdigest()}
    bad = {**good, "content_md5": "not-an-md5"}
    r = _queue(t, t.message("md5-ok", attachments=[good]), t.message("md5-bad", attachments=[bad]))
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    [rejected] = r.json()["rejected"]
    assert (rejected["id"], rejected["code"]) == ("md5-bad", "invalid_content_md5")
    assert "content_md5" in rejected["reason"]
    # alone, the same message makes an all-invalid batch
    r = _queue(t, t.message("md5-bad-2", attachments=[{**good, "content_md5": "0" * 31}]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "all_rejected", r.text
    assert r.json()["detail"]["rejected"][0]["code"] == "invalid_content_md5"
    active = _listed(t, active_only="true")  # read at once
    assert "md5-bad" not in active and "md5-bad-2" not in active
    assert "sent_ts" in _final(t, "md5-ok")
    _wait_mail(smtp, t, "md5-ok")
    assert _mail(smtp, t, "md5-bad") is None and _mail(smtp, t, "md5-bad-2") is None


def test_failed_fetches_name_the_attachment(new_tenant: Callable[..., Tenant], smtp: RecordingSmtpServer,
                                            static: StaticServer) -> None:
    t = new_tenant()
    ok = {"filename": "report.pdf", "storage_path": static.url + "/report.pdf"}
    missing = {"filename": "missing.pdf", "storage_path": static.url + "/missing.pdf"}
    _queued(t, t.message("url-ok", attachments=[ok]), t.message("url-404", attachments=[missing]))
    assert "sent_ts" in _final(t, "url-ok")
    [part] = list(_wait_mail(smtp, t, "url-ok").message.iter_attachments())
    assert part.get_content_type() == "application/pdf"  # the server said octet-stream; the name says pdf
    failed = _final(t, "url-404")
    assert failed["error"].startswith("Attachment fetch failed for missing.pdf: ") and "HTTP 404" in failed["error"]
    assert _mail(smtp, t, "url-404") is None


def test_an_endpoint_answering_5xx_fails_the_message_after_the_retries(new_tenant: Callable[..., Tenant],
                                                                       smtp: RecordingSmtpServer) -> None:
    t = new_tenant(client_attachment_path="/attachments")
    busy = {"on": True}
    t.client.responder = lambda req: (503, {"error": "busy"}) if req.path == "/attachments" and busy["on"] else None
    _queued(t, t.message("busy-1", attachments=[{"filename": "busy.pdf", "storage_path": "doc=1"}]))
    failed = _final(t, "busy-1", timeout=120)
    assert "error_ts" in failed, failed
    assert failed["error"].startswith("Attachment fetch failed for busy.pdf: ") and "HTTP 503" in failed["error"]
    assert "gave up after" in failed["error"]
    tries = [r for r in t.client.requests if r.path == "/attachments"]
    assert len(tries) > 1  # retried before failing
    deferred = [r for r in t.client.reports_for("busy-1") if "deferred_ts" in r]
    assert deferred and all("busy.pdf" in (r.get("deferred_reason") or "") for r in deferred), deferred
    assert _mail(smtp, t, "busy-1") is None
    # control: the endpoint answers again, the same attachment is delivered
    busy["on"] = False
    t.client.files = {"doc=1": PDF}
    _queued(t, t.message("busy-2", attachments=[{"filename": "busy.pdf", "storage_path": "doc=1"}]))
    assert "sent_ts" in _final(t, "busy-2")
    _wait_mail(smtp, t, "busy-2")


# --- headers ----------------------------------------------------------------------------------------

def test_headers_override_the_defaults_and_null_is_dropped(new_tenant: Callable[..., Tenant],
                                                            smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    msg = t.message("hdr-1", reply_to=f"default@{t.id}.test",
                    headers={"Reply-To": f"Desk <desk@{t.id}.test>", "X-Dropped": None, "X-Kept": "yes",
                             "Subject": "From the headers"})
    r = _queue(t, msg)
    assert r.status_code == 200 and r.json() == {"ok": True, "queued": 1, "rejected": []}, r.text
    listed = _listed(t)["hdr-1"]  # read at once
    assert listed["subject"] == "From the headers"
    got = _wait_mail(smtp, t, "hdr-1").message
    assert got.get_all("Reply-To") == [f"Desk <desk@{t.id}.test>"]  # the only Reply-To
    assert got.get_all("Subject") == ["From the headers"]
    assert got["X-Kept"] == "yes" and "X-Dropped" not in got


def test_headers_that_would_spoof_or_break_the_mail_stay_refused(new_tenant: Callable[..., Tenant],
                                                                 smtp: RecordingSmtpServer) -> None:
    t, other = new_tenant(), new_tenant()
    attacks = {
        "spoof-tenant": ({"X-Postbus-Tenant": other.id}, "header_not_allowed"),
        "spoof-id": ({"X-Postbus-Message-Id": "victim-1"}, "header_not_allowed"),
        "mime": ({"Content-Type": "text/html"}, "header_not_allowed"),
        "inject": ({"Reply-To": "a@b.test\r\nBcc: evil@x.test"}, "invalid_header"),
    }
    r = _queue(t, t.message("hdr-ok", headers={"X-Campaign": "c1"}),
               *(t.message(mid, headers=h) for mid, (h, _) in attacks.items()))
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    codes = {item["id"]: item.get("code") for item in r.json()["rejected"]}
    assert codes == {mid: code for mid, (_, code) in attacks.items()}, r.json()
    active = _listed(t, active_only="true")
    assert not set(attacks) & set(active)
    # positive control delivered; nothing of the refused ones reached the server
    got = _wait_mail(smtp, t, "hdr-ok").message
    assert got.get_all("X-Postbus-Tenant") == [t.id] and got["X-Campaign"] == "c1"
    assert all(_mail(smtp, t, mid) is None for mid in attacks)
    assert not smtp.messages_to("evil@x.test")


def test_a_from_header_passes_the_domain_checks_of_the_field(new_tenant: Callable[..., Tenant],
                                                              smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    registered = f"gc{uuid.uuid4().hex[:10]}.example.test"
    assert t.http.put(f"/domains/{registered}/outbound", json={}).status_code == 200  # registered, unverified
    own = t.message("from-ok", headers={"From": f"News <news@{t.id}.test>"})
    blocked = t.message("from-blocked", headers={"From": f"x@{registered}"})
    r = _queue(t, own, blocked)
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    [item] = r.json()["rejected"]
    assert item["id"] == "from-blocked" and item["reason"].startswith("sender_domain_not_verified"), item
    got = _wait_mail(smtp, t, "from-ok")
    assert got.message["From"] == f"News <news@{t.id}.test>" and got.mail_from == f"news@{t.id}.test"
    assert _mail(smtp, t, "from-blocked") is None


# --- batch_size -------------------------------------------------------------------------------------

@pytest.fixture
def slow_smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer(delay=0.3) as s:  # slow DATA: concurrent sessions overlap visibly
        yield s


def test_batch_size_one_sends_in_strict_priority_fifo_order(new_tenant: Callable[..., Tenant],
                                                             slow_smtp: RecordingSmtpServer) -> None:
    t = new_tenant()
    base = {"host": slow_smtp.host, "port": slow_smtp.port, "use_tls": False}
    for aid, extra in (("one", {"batch_size": 1}), ("pool", {})):  # pool: the default concurrency (control)
        assert t.http.post("/account", json={"id": aid, **base, **extra}).status_code == 200
    listed = {a["id"]: a for a in t.http.get("/accounts").json()["accounts"]}
    assert listed["one"]["batch_size"] == 1 and listed["pool"]["batch_size"] is None

    assert t.http.post("/commands/suspend").status_code == 200
    priorities = [3, 2, 3, 0, 1, 3, 2, 0, 1, 3]
    for batch in (range(0, 4), range(4, 7), range(7, 10)):  # three calls: FIFO across calls too
        _queued(t, *(t.message(f"B{i}", account_id="one", priority=priorities[i], subject=f"B{i}") for i in batch))
    _queued(t, *(t.message(f"P{i}", account_id="pool", subject=f"P{i}") for i in range(10)))
    assert len(_listed(t, active_only="true")) == 20  # read at once: all held
    assert t.http.post("/commands/activate").status_code == 200

    def arrivals(prefix: str) -> list[ReceivedMessage]:
        return [m for m in slow_smtp.messages if m.message["X-Postbus-Tenant"] == t.id and m.subject.startswith(prefix)]

    wait_until(lambda: len(arrivals("B")) == 10 and len(arrivals("P")) == 10, timeout=90, what="20 deliveries")
    one, pool = arrivals("B"), arrivals("P")
    assert len({m.peer for m in pool}) > 1  # control: without batch_size the account's mail goes in parallel
    assert [m.subject for m in one] == [f"B{i}" for i in sorted(range(10), key=lambda i: (priorities[i], i))]
    assert len({m.peer for m in one}) == 1  # one session, one message at a time
