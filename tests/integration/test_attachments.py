"""Attachments end to end: REST -> Kafka -> sender fetch (base64, http_url, endpoint, storage) -> SMTP,
checksum and policy failures reported to the client, retried fetches, large_file_config reject and
rewrite with a signed download link served by the API."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer
from tests.support.static_server import StaticServer

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x01" * 300
CSV = "name,city\nJosé,Zürich\n".encode()
BLOB = b"0123456789abcdef" * 256  # 4 KiB


@pytest.fixture
def static() -> Iterator[StaticServer]:
    with StaticServer({"/report.pdf": PDF, "/flaky.bin": BLOB, "/blob.bin": BLOB}) as srv:
        yield srv


def _mail(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> EmailMessage | None:
    for m in smtp.messages:
        if m.message["X-Postbus-Tenant"] == tenant_id and m.message["X-Postbus-Message-Id"] == mid:
            return m.message
    return None


def _files(msg: EmailMessage) -> dict[str, bytes]:
    return {part.get_filename(): part.get_payload(decode=True) for part in msg.iter_attachments()}


def _final(t: Tenant, mid: str, timeout: float = 60) -> dict:
    return t.client.wait_for_report(lambda r: r.get("id") == mid and ("sent_ts" in r or "error_ts" in r), timeout)


def _queue(t: Tenant, *messages: dict) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": list(messages)})
    assert r.status_code == 200, r.text
    assert r.json()["queued"] == len(messages), r.text


def test_every_fetch_mode_delivers_the_right_bytes(system, admin: httpx.Client, new_tenant,
                                                   smtp: RecordingSmtpServer, static: StaticServer) -> None:
    root = Path(system.state_dir) / "files" / uuid.uuid4().hex
    root.mkdir(parents=True)
    (root / "data.csv").write_bytes(CSV)
    t: Tenant = new_tenant(client_attachment_path="/attachments", large_file_config={"storage_url": f"file://{root}"})
    t.client.files = {"doc_id=42": PNG}
    attachments = [
        {"filename": "inline.txt", "storage_path": "base64:" + base64.b64encode(b"inline bytes").decode()},
        {"filename": "report.pdf", "storage_path": static.url + "/report.pdf", "mime_type": "application/pdf",
         "content_md5": hashlib.md5(PDF).hexdigest()},
        {"filename": "logo.png", "storage_path": "doc_id=42", "mime_type": "image/png",
         "content_md5": base64.b64encode(hashlib.md5(PNG).digest()).decode()},
        {"filename": "data.csv", "storage_path": "data.csv", "fetch_mode": "storage", "mime_type": "text/csv"},
    ]
    # the attachment's own credentials for the http_url fetch travel encrypted
    own_auth = {"filename": "blob.bin", "storage_path": static.url + "/blob.bin",
                "auth": {"method": "bearer", "token": "attachment-token-xyz"}}
    _queue(t, t.message("att-all", attachments=[*attachments, own_auth]))
    assert "sent_ts" in _final(t, "att-all"), t.client.reports_for("att-all")
    msg = wait_until(lambda: _mail(smtp, t.id, "att-all"), timeout=60, what="the mail")
    files = _files(msg)
    assert files == {"inline.txt": b"inline bytes", "report.pdf": PDF, "logo.png": PNG, "data.csv": CSV,
                     "blob.bin": BLOB}
    types = {p.get_filename(): p.get_content_type() for p in msg.iter_attachments()}
    assert types["report.pdf"] == "application/pdf" and types["logo.png"] == "image/png"
    # endpoint mode: POST {storage_path} with the tenant's client auth
    calls = [c for c in t.client.requests if c.path == "/attachments"]
    assert calls and calls[0].json == {"storage_path": "doc_id=42"} and calls[0].authorized
    assert {"authorization": "Bearer attachment-token-xyz"}.items() <= static.headers[-1].items()
    export = admin.get("/command-log/export", params={"tenant_id": t.id})
    assert export.status_code == 200 and "attachment-token-xyz" not in export.text


def test_checksum_mismatch_and_refused_sources_are_errors(system, new_tenant, static: StaticServer) -> None:
    t: Tenant = new_tenant()
    bad_md5 = {"filename": "report.pdf", "storage_path": static.url + "/report.pdf",
               "content_md5": hashlib.md5(b"something else").hexdigest()}
    # never a fetch target, even with private networks allowed (as in this test system)
    unspecified = {"filename": "x.bin", "storage_path": "http://0.0.0.0:9/x.bin"}
    escape = {"filename": "passwd", "storage_path": "/etc/passwd", "fetch_mode": "storage"}
    _queue(t, t.message("att-md5", attachments=[bad_md5]), t.message("att-ssrf", attachments=[unspecified]),
           t.message("att-escape", attachments=[escape]))
    assert "content_md5 mismatch" in _final(t, "att-md5")["error"]
    assert "non-public address" in _final(t, "att-ssrf")["error"]
    assert "storage" in _final(t, "att-escape")["error"]


def test_fetch_failures_are_retried_then_sent(system, new_tenant, smtp: RecordingSmtpServer,
                                              static: StaticServer) -> None:
    t: Tenant = new_tenant()
    static.fail("/flaky.bin", 2, 503)
    flaky = {"filename": "flaky.bin", "storage_path": static.url + "/flaky.bin"}
    _queue(t, t.message("att-flaky", attachments=[flaky]))
    final = _final(t, "att-flaky", timeout=90)
    assert "sent_ts" in final, t.client.reports_for("att-flaky")
    assert static.hits("/flaky.bin") == 3
    deferred = [r for r in t.client.reports_for("att-flaky") if "deferred_ts" in r]
    assert deferred and "HTTP 503" in (deferred[0].get("deferred_reason") or ""), t.client.reports_for("att-flaky")
    assert _files(wait_until(lambda: _mail(smtp, t.id, "att-flaky"), timeout=60)) == {"flaky.bin": BLOB}


def test_large_files_rejected_or_rewritten_to_a_signed_link(system, new_tenant, smtp: RecordingSmtpServer,
                                                            static: StaticServer) -> None:
    store = Path(system.state_dir) / "files" / "large"
    small = 1000 / (1024 * 1024)  # 1000 bytes, in MB
    rejecting: Tenant = new_tenant(large_file_config={"enabled": True, "max_size_mb": small, "action": "reject"})
    rewriting: Tenant = new_tenant(large_file_config={"enabled": True, "max_size_mb": small, "action": "rewrite",
                                                      "storage_url": f"file://{store}", "file_ttl_days": 1})
    big = {"filename": "big.bin", "storage_path": static.url + "/blob.bin"}
    tiny = {"filename": "tiny.txt", "storage_path": "base64:" + base64.b64encode(b"tiny").decode()}
    _queue(rejecting, rejecting.message("att-big", attachments=[big]))
    _queue(rewriting, rewriting.message("att-big", body="<p>See below</p>", content_type="html",
                                        attachments=[big, tiny]))
    assert "attachment too large" in _final(rejecting, "att-big")["error"]
    assert "sent_ts" in _final(rewriting, "att-big"), rewriting.client.reports_for("att-big")

    msg = wait_until(lambda: _mail(smtp, rewriting.id, "att-big"), timeout=60, what="the rewritten mail")
    assert _files(msg) == {"tiny.txt": b"tiny"}  # the big one left the mail
    body = msg.get_body(("html",)).get_content()
    assert "<p>See below</p>" in body
    link = body.split('href="', 1)[1].split('"', 1)[0]
    assert link.startswith(system.url("api") + "/files/")
    r = httpx.get(link, timeout=30)
    assert r.status_code == 200 and r.content == BLOB
    assert "big.bin" in r.headers["content-disposition"]

    token = link.rsplit("/", 1)[1]
    claims, sig = token.split(".")
    forged_claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    forged_claims["u"] = "file:///etc/passwd"
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).decode().rstrip("=") + "." + sig
    for bad in (forged, token[:-3] + "AAA", "garbage"):
        r = httpx.get(f"{system.url('api')}/files/{bad}", timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_link", r.text


def test_an_http_storage_root_is_fetched_through_the_network_policy(system, admin: httpx.Client, new_tenant,
                                                                    smtp: RecordingSmtpServer,
                                                                    static: StaticServer) -> None:
    """An admin-set http(s) storage root (this system allows private networks; the secure system's
    tests/security/test_storage_roots.py shows the same root refused under the production policy)."""
    t: Tenant = new_tenant()
    r = admin.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_url": static.url + "/"}})
    assert r.status_code == 200, r.text
    att = {"filename": "report.pdf", "storage_path": "report.pdf", "fetch_mode": "storage"}
    escape = {"filename": "x", "storage_path": "../../etc/hostname", "fetch_mode": "storage"}
    _queue(t, t.message("att-http-root", attachments=[att]), t.message("att-http-escape", attachments=[escape]))
    assert "sent_ts" in _final(t, "att-http-root"), t.client.reports_for("att-http-root")
    assert _files(wait_until(lambda: _mail(smtp, t.id, "att-http-root"), timeout=60)) == {"report.pdf": PDF}
    assert "outside the configured storage" in _final(t, "att-http-escape")["error"]
    assert _mail(smtp, t.id, "att-http-escape") is None
