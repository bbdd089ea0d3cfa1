"""genro-mail-proxy 0.6 conventions (issue 9 §4), the pure parts: limits of 0 or less are no limit,
batch_size caps an account's concurrency, the {MD5:...} filename marker, the MIME type from the file
name, content_md5 checked at the API, standard headers in ``headers`` override the message fields."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from services.api.message_validation import Rejected, valid_md5, validate_message
from services.common.settings import Settings
from services.sender import attachments, pipeline
from services.sender.attachments import choose_mime, guess_mime, normalize_md5, prepare_attachment, split_md5_marker
from services.sender.mime import build_message
from services.sender.rate_windows import evaluate
from services.sender.smtp_pool import pool_size
from tests.support.client_app import ClientApp

MIN = 60_000
T0 = 1_700_000_040_000
PDF = b"%PDF-1.7 " + bytes(range(256)) * 4
KEY = Fernet.generate_key().decode()


# --- limits: 0 or negative = unlimited -----------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, -1, -100, None])
def test_zero_or_negative_limit_is_no_limit(limit) -> None:
    state = {"m": [T0, 10_000], "h": [T0 - T0 % (60 * MIN), 10_000]}
    assert evaluate(state, {"m": limit, "h": limit, "d": limit}, T0, MIN) == (None, None)


def test_a_negative_limit_does_not_hide_a_positive_one() -> None:
    state = None
    for i in range(2):
        state, until = evaluate(state, {"m": 2, "h": -1, "d": 0}, T0 + i, MIN)
        assert until is None
    assert state == {"m": [T0, 2]}  # only the positive window counts
    assert evaluate(state, {"m": 2, "h": -1, "d": 0}, T0 + 5, MIN) == (None, T0 + MIN)


# --- batch_size caps the account's workers ---------------------------------------------------------------

def test_batch_size_caps_the_pool() -> None:
    default = Settings().sender_connections_per_account
    assert pool_size({"batch_size": 1}) == 1
    assert pool_size({"batch_size": 1, "max_connections": 5}) == 1
    assert pool_size({"batch_size": 3, "max_connections": 2}) == 2  # the smaller of the two
    assert pool_size({"batch_size": 500}) == default  # a large batch never raises the pool
    for unset in (None, 0, -4):
        assert pool_size({"batch_size": unset, "max_connections": 3}) == 3
        assert pool_size({"batch_size": unset}) == default


# --- the {MD5:...} marker ---------------------------------------------------------------------------------

MD5 = "0123456789abcdef0123456789ABCDEF"


@pytest.mark.parametrize(("name", "clean"), [
    (f"report_{{MD5:{MD5}}}.pdf", "report.pdf"),
    (f"{{MD5:{MD5}}}_report.pdf", "report.pdf"),
    (f"a_{{MD5:{MD5}}}_b.txt", "a_b.txt"),
    (f"report{{MD5:{MD5}}}.pdf", "report.pdf"),
    (f"{{MD5:{MD5}}}", "attachment"),
    ("plain_name.pdf", "plain_name.pdf"),
    ("my__file_.pdf", "my__file_.pdf"),  # no marker: the name is untouched
])
def test_marker_is_stripped_from_the_name(name, clean) -> None:
    got, md5 = split_md5_marker(name)
    assert got == clean
    assert md5 == (MD5.lower() if "{MD5:" in name else None)


def test_a_short_marker_is_stripped_but_is_no_cache_key() -> None:
    assert split_md5_marker("x_{MD5:abc}.pdf") == ("x.pdf", None)


def test_normalize_md5() -> None:
    digest = hashlib.md5(b"x").digest()
    assert normalize_md5(digest.hex().upper()) == digest.hex()
    assert normalize_md5(base64.b64encode(digest).decode()) == digest.hex()
    for bad in ("", None, "xyz", "0" * 31, base64.b64encode(b"0" * 15).decode()):
        assert normalize_md5(bad) is None


# --- MIME type ------------------------------------------------------------------------------------------

def test_mime_from_the_name_when_absent_or_generic() -> None:
    assert guess_mime("report.pdf") == "application/pdf"
    assert guess_mime("archive.tar.gz") == "application/gzip"
    assert guess_mime("noextension") is None
    assert choose_mime(None, None, "report.pdf") == "application/pdf"
    assert choose_mime(None, "application/octet-stream", "report.pdf") == "application/pdf"
    assert choose_mime(None, "image/png", "report.pdf") == "image/png"  # a specific fetched type stays
    assert choose_mime("text/plain", "image/png", "report.pdf") == "text/plain"  # the client's wins
    assert choose_mime("bad value\r\nX: y", None, "report.pdf") == "application/pdf"
    assert choose_mime(None, "application/octet-stream", "blob") == "application/octet-stream"
    assert choose_mime(None, None, "blob") is None


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def settings() -> Settings:
        return Settings(secret_key=KEY, state_dir=tmp_path, allow_private_networks=True,
                        attachments_max_bytes=1 << 16, attachments_hard_max_bytes=1 << 20,
                        attachments_fetch_timeout_s=5)

    monkeypatch.setattr(attachments, "get_settings", settings)
    monkeypatch.setattr(attachments, "_cache", None)


def _ctx(tenant: dict[str, Any], tenant_id: str = "t1") -> pipeline.SendContext:
    return pipeline.SendContext(key="k", message={"tenant_id": tenant_id, "id": "m1"}, account={},
                                tenant={"id": tenant_id, **tenant}, partition=0, attempt=1, now_ms=0)


def _att(filename: str, path: str, **kw: Any) -> dict[str, Any]:
    return {"filename": filename, "storage_path": path, "fetch_mode": "endpoint", "mime_type": None,
            "content_md5": None, "auth": None, **kw}


async def test_marker_keys_the_cache_and_is_stripped(conf) -> None:
    md5 = hashlib.md5(PDF).hexdigest()
    with ClientApp(token=None, attachments_path="/a", files={f"doc={i}": PDF for i in range(1, 5)}) as app:
        tenant = {"client_base_url": app.url, "client_attachment_path": "/a"}
        got = await prepare_attachment(_ctx(tenant), _att(f"report_{{MD5:{md5}}}.pdf", "doc=1"))
        assert got.data == PDF and got.att["filename"] == "report.pdf"
        assert got.att["mime_type"] == "application/pdf"  # the endpoint answered octet-stream
        assert len(app.requests) == 1
        # another source with the same marker: served from the tenant's cache, no fetch
        again = await prepare_attachment(_ctx(tenant), _att(f"copy_{{MD5:{md5}}}.pdf", "doc=2"))
        assert again.data == PDF and again.att["filename"] == "copy.pdf" and len(app.requests) == 1
        # content_md5 is a cache key too (hex or base64)
        b64 = base64.b64encode(hashlib.md5(PDF).digest()).decode()
        await prepare_attachment(_ctx(tenant), _att("third.pdf", "doc=2", content_md5=b64))
        assert len(app.requests) == 1
        # another tenant never gets it from the cache
        await prepare_attachment(_ctx(tenant, "t2"), _att(f"report_{{MD5:{md5}}}.pdf", "doc=1"))
        assert len(app.requests) == 2
        # a marker that does not match the content: fetched, and the cache holds it under its real MD5
        wrong = "f" * 32
        got = await prepare_attachment(_ctx(tenant), _att(f"x_{{MD5:{wrong}}}.pdf", "doc=3"))
        assert got.data == PDF and len(app.requests) == 3
        got = await prepare_attachment(_ctx(tenant), _att(f"y_{{MD5:{wrong}}}.pdf", "doc=4"))
        assert len(app.requests) == 4  # no entry under the wrong MD5


async def test_fetch_failures_name_the_attachment(conf) -> None:
    with ClientApp(token=None, attachments_path="/a", files={"doc=1": PDF}) as app:
        tenant = {"client_base_url": app.url, "client_attachment_path": "/a"}
        with pytest.raises(pipeline.PrepareError) as err:
            await prepare_attachment(_ctx(tenant), _att("missing_{MD5:" + "a" * 32 + "}.pdf", "nope"))
        assert err.value.reason.startswith("Attachment fetch failed for missing_{MD5:" + "a" * 32 + "}.pdf: ")
        assert "HTTP 404" in err.value.reason and not err.value.temporary
        app.files.clear()  # no files route any more: every POST gets the default answer, a 503
        app.set_response({"error": "busy"}, status=503)
        with pytest.raises(pipeline.PrepareError) as err:
            await prepare_attachment(_ctx(tenant), _att("report.pdf", "doc=1"))
        assert err.value.reason.startswith("Attachment fetch failed for report.pdf: ") and err.value.temporary


# --- API: content_md5, headers ---------------------------------------------------------------------------

GOOD = {"id": "m1", "tenant_id": "acme", "account_id": "main", "from": "app@acme.test",
        "to": ["a@x.test"], "subject": "Hi", "body": "text", "reply_to": "default@acme.test"}


def check(raw: dict[str, Any]) -> dict[str, Any]:
    return validate_message(raw, default_priority=2, account_exists=lambda t, a: True,
                            tenant_exists=lambda t: True, now_ms=1)


def test_valid_md5() -> None:
    digest = hashlib.md5(b"x").digest()
    assert valid_md5(digest.hex()) and valid_md5(digest.hex().upper()) and valid_md5(base64.b64encode(digest).decode())
    for bad in ("xyz", "0" * 31, "g" * 32, base64.b64encode(b"0" * 20).decode(), "not base64!"):
        assert not valid_md5(bad)


@pytest.mark.parametrize("md5", ["xyz", "0" * 31, "z" * 32, 12345, ["a"]])
def test_invalid_content_md5_rejected(md5) -> None:
    raw = {**GOOD, "attachments": [{"filename": "a.pdf", "storage_path": "base64:YQ==", "content_md5": md5}]}
    with pytest.raises(Rejected, match="content_md5") as err:
        check(raw)
    assert err.value.code == "invalid_content_md5"


def test_valid_content_md5_kept() -> None:
    md5 = hashlib.md5(b"a").hexdigest()
    raw = {**GOOD, "attachments": [{"filename": "a.pdf", "storage_path": "base64:YQ==", "content_md5": md5}]}
    assert check(raw)["attachments"][0]["content_md5"] == md5
    raw["attachments"][0]["content_md5"] = ""
    assert check(raw)["attachments"][0]["content_md5"] is None


def test_standard_headers_override_the_fields() -> None:
    rec = check({**GOOD, "headers": {"Reply-To": "R <reply@acme.test>", "subject": "Override",
                                     "To": "x@y.test, z@y.test", "Cc": "c@y.test", "Message-ID": "<m1@acme.test>",
                                     "Return-Path": "bounce@acme.test", "X-Campaign": "c1"}})
    assert rec["reply_to"] == "R <reply@acme.test>" and rec["subject"] == "Override"
    assert rec["to"] == ["x@y.test", "z@y.test"] and rec["cc"] == ["c@y.test"]
    assert rec["message_id"] == "<m1@acme.test>" and rec["return_path"] == "bounce@acme.test"
    assert rec["headers"] == {"X-Campaign": "c1"}
    # From in headers is the from field: every check of the field (and of its domain) applies
    assert check({**GOOD, "headers": {"From": "Other <other@acme.test>"}})["from_addr"] == "Other <other@acme.test>"
    with pytest.raises(Rejected, match="invalid address in from"):
        check({**GOOD, "headers": {"From": "not an address"}})
    with pytest.raises(Rejected, match="invalid address in to"):
        check({**GOOD, "headers": {"To": "nope"}})


def test_null_header_is_dropped() -> None:
    rec = check({**GOOD, "headers": {"Reply-To": None, "X-Gone": None, "X-Kept": "1"}})
    assert rec["reply_to"] == "default@acme.test" and rec["headers"] == {"X-Kept": "1"}


@pytest.mark.parametrize(("headers", "code"), [
    ({"X-Postbus-Tenant": "other"}, "header_not_allowed"),
    ({"x-postbus-message-id": "m9"}, "header_not_allowed"),
    ({"Content-Type": "text/html"}, "header_not_allowed"),
    ({"MIME-Version": "2.0"}, "header_not_allowed"),
    ({"Content-Transfer-Encoding": "8bit"}, "header_not_allowed"),
    ({"DKIM-Signature": "v=1; d=bank.test"}, "header_not_allowed"),
    ({"Reply-To": "a@b.test\r\nBcc: evil@x.test"}, "invalid_header"),
    ({"X-A": "a\nb"}, "invalid_header"),
    ({"Subject": "a\r\nBcc: evil@x.test"}, "invalid_header"),
    ({"Date": "not a date"}, "invalid_header"),
    ({"Bad Name": "v"}, "invalid_header"),
])
def test_headers_still_refused(headers, code) -> None:
    with pytest.raises(Rejected) as err:
        check({**GOOD, "headers": headers})
    assert err.value.code == code


def test_date_header_replaces_the_generated_one() -> None:
    rec = check({**GOOD, "headers": {"Date": "Tue, 01 Oct 2024 10:00:00 +0000"}})
    raw = build_message(rec).decode()
    head = raw.split("\r\n\r\n", 1)[0]
    assert [line for line in head.split("\r\n") if line.lower().startswith("date:")] == [
        "Date: Tue, 01 Oct 2024 10:00:00 +0000"]
    plain = build_message(check(GOOD)).decode().split("\r\n\r\n", 1)[0]
    assert sum(1 for line in plain.split("\r\n") if line.startswith("Date: ")) == 1
    assert "Reply-To: default@acme.test" in plain


def test_filesystem_fetch_mode_is_storage() -> None:
    att = {"filename": "a.pdf", "storage_path": "/srv/files/a.pdf", "fetch_mode": "filesystem"}
    raw = {**GOOD, "attachments": [att]}
    assert check(raw)["attachments"][0]["fetch_mode"] == "storage"  # confined to the operator's storage roots
