"""Issue 8, finding 8: unbounded work before authentication and per message.

Request bodies are capped before anything parses them: an oversized body, announced by
Content-Length or streamed chunked without one, is answered 413 ``payload_too_large`` without a
token (authentication never ran), with the smaller cap on the public webhook route; a normal body
works. Per message: more than ``messages_max_attachments`` attachments, or more inline bytes than
``messages_max_attachment_bytes``, is rejected with a stable reason and nothing is queued or sent;
within the limits the message is queued and delivered. Raw sockets send the oversized bodies, so
the test controls exactly how much of a body was ever sent."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from services.common.settings import Settings
from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer

MAX_BODY = Settings.model_fields["api_max_body_bytes"].default
MAX_WEBHOOK_BODY = Settings.model_fields["api_max_webhook_body_bytes"].default
MAX_ATTACHMENTS = Settings.model_fields["messages_max_attachments"].default
MAX_INLINE = Settings.model_fields["messages_max_attachment_bytes"].default
MiB = 1024 * 1024


def _raw_post(base: str, path: str, parts: Iterable[bytes], *, content_length: int | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """POST over a raw socket: with ``content_length`` the header announces it (whatever ``parts``
    holds), else the body is sent chunked. Returns (status, JSON body)."""
    u = urlsplit(base)
    s = socket.create_connection((u.hostname, u.port), timeout=60)
    head = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    chunked = content_length is None
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {content_length}")
    try:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for p in parts:
                s.sendall(f"{len(p):x}\r\n".encode() + p + b"\r\n" if chunked else p)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the rest: the answer is still there
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    finally:
        s.close()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1])
    if b"transfer-encoding: chunked" in rest.partition(b"\r\n\r\n")[0].lower():
        body = _unchunk(body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        n = int(size_line.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2:]
    return out


def _messages_body(t: Tenant, mid: str) -> bytes:
    return json.dumps({"messages": [t.message(mid)]}).encode()


def test_an_oversized_body_is_refused_before_authentication(system, new_tenant, smtp: RecordingSmtpServer) -> None:
    api = system.url("api")
    t: Tenant = new_tenant()
    # controls: a normal body without a token reaches authentication (401), with the key it is queued
    status, body = _raw_post(api, "/commands/add-messages", [b'{"messages": []}'], content_length=16)
    assert status == 401, body
    status, body = _raw_post(api, "/commands/add-messages", [_messages_body(t, "normal")],
                             content_length=len(_messages_body(t, "normal")), headers={"X-API-Token": t.api_key})
    assert status == 200 and body["queued"] == 1, body
    smtp.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Tenant"] == t.id)

    # announced by Content-Length: refused at once, without a token, before the body is even sent
    status, body = _raw_post(api, "/commands/add-messages", [b'{"messages": ['], content_length=MAX_BODY + 1)
    assert status == 413 and body == {"ok": False, "error": {
        "code": "payload_too_large", "message": f"the request body is larger than {MAX_BODY} bytes"}}, body

    # streamed without a length (chunked): refused once the bytes pass the limit, still before auth,
    # even with a valid key the body is never parsed (nothing queued)
    filler = b" " * MiB
    parts = [b'{"messages": [' + json.dumps(t.message("streamed")).encode() + b"]"] + [filler] * (MAX_BODY // MiB + 1)
    status, body = _raw_post(api, "/commands/add-messages", parts)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    status, body = _raw_post(api, "/commands/add-messages", parts, headers={"X-API-Token": t.api_key})
    assert status == 413 and body["error"]["code"] == "payload_too_large", body

    # the API still works, and the oversized request was not queued: a later message is sent, the
    # streamed one never is
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("after")]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    smtp.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Message-Id"] == "after"
                  and m.message["X-Postbus-Tenant"] == t.id)
    assert not [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == t.id
                and m.message["X-Postbus-Message-Id"] == "streamed"]
    assert t.client.reports_for("streamed") == []


def test_the_webhook_route_has_a_smaller_cap(system) -> None:
    api = system.url("api")
    # control: a small body is read and judged by the route itself (not an SNS message)
    status, body = _raw_post(api, "/webhooks/ses", [b'{"hello": "world"}'], content_length=18)
    assert status != 413 and status in (400, 403), (status, body)
    # over the webhook cap (far under the general one): 413, by length and streamed
    status, body = _raw_post(api, "/webhooks/ses", [b"{"], content_length=MAX_WEBHOOK_BODY + 1)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert str(MAX_WEBHOOK_BODY) in body["error"]["message"]
    status, body = _raw_post(api, "/webhooks/ses", [b" " * (256 * 1024)] * 5)
    assert status == 413 and body["error"]["code"] == "payload_too_large", body


def _inline(name: str, size: int) -> dict[str, Any]:
    return {"filename": name, "storage_path": "base64:" + base64.b64encode(b"a" * size).decode()}


def _final(t: Tenant, mid: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in t.client.reports_for(mid) if "sent_ts" in r or "error_ts" in r),
                                   None), timeout, what=f"{mid} final report")


def test_attachment_count_and_inline_size_per_message_are_capped(system, new_tenant,
                                                                 smtp: RecordingSmtpServer) -> None:
    t: Tenant = new_tenant()
    attacks = {
        "too-many": ([_inline(f"f{i}.txt", 10) for i in range(MAX_ATTACHMENTS + 1)], "too many attachments"),
        "too-big": ([_inline("a.bin", MAX_INLINE // 2 + 1024), _inline("b.bin", MAX_INLINE // 2 + 1024)],
                    "attachments too large"),
    }
    for mid, (atts, reason) in attacks.items():
        r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid, attachments=atts)]})
        assert r.status_code == 400, r.text
        out = r.json()
        assert out["queued"] == 0 and out["error"]["code"] == "all_rejected", out
        [rej] = out["rejected"]
        assert rej["id"] == mid and rej["reason"].startswith(reason), rej

    # controls: at the limits, queued and delivered with every attachment
    controls = {
        "many": [_inline(f"f{i}.txt", 10) for i in range(MAX_ATTACHMENTS)],
        "big": [_inline("a.bin", MAX_INLINE // 2 - 1024), _inline("b.bin", MAX_INLINE // 2 - 1024)],
    }
    r = t.http.post("/commands/add-messages", json={"messages": [t.message(mid, attachments=atts)
                                                                 for mid, atts in controls.items()]})
    assert r.status_code == 200 and r.json()["queued"] == 2 and r.json()["rejected"] == [], r.text
    for mid, atts in controls.items():
        assert "sent_ts" in _final(t, mid)
        [got] = smtp.wait_for(1, timeout=30, predicate=lambda m, mid=mid: m.message["X-Postbus-Message-Id"] == mid
                              and m.message["X-Postbus-Tenant"] == t.id)
        assert len(list(got.message.iter_attachments())) == len(atts)

    # the refused ones were reported to the tenant as rejected and never reached the SMTP server
    for mid, (_, reason) in attacks.items():
        final = _final(t, mid)
        assert "error_ts" in final and reason in final["error"], final
        assert not [m for m in smtp.messages if m.message["X-Postbus-Tenant"] == t.id
                    and m.message["X-Postbus-Message-Id"] == mid]
