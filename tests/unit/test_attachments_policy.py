"""Attachment policy without a running system: address checks, checksums, storage confinement,
large_file_config parsing, the cache, signed links and the download-link body rewrite."""

from __future__ import annotations

import base64
import hashlib
import json
import os

import pytest

from services.common import signed_links
from services.common.netpolicy import NetPolicy
from services.sender import pipeline
from services.sender.attachments import (
    ByteCache,
    Fetched,
    LargeFilePolicy,
    Prepared,
    cache_key,
    md5_matches,
    resolve_in_root,
)
from services.sender.prepare_mime import with_links


def address_allowed(ip: str, allow_private: bool) -> bool:
    return NetPolicy(allow_private=allow_private).address_allowed(ip)


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254",
                                "100.64.0.1", "::1", "fe80::1", "fc00::5", "::ffff:127.0.0.1", "0.0.0.0",
                                "224.0.0.1", "255.255.255.255", "not-an-ip"])
def test_non_public_addresses_are_refused_by_default(ip: str) -> None:
    assert not address_allowed(ip, allow_private=False)


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert address_allowed(ip, allow_private=False)


def test_operator_may_allow_private_networks_but_never_multicast_or_unspecified() -> None:
    assert address_allowed("127.0.0.1", allow_private=True)
    assert address_allowed("10.0.0.1", allow_private=True)
    assert not address_allowed("0.0.0.0", allow_private=True)
    assert not address_allowed("ff02::1", allow_private=True)


def test_md5_hex_or_base64() -> None:
    data = b"hello attachment"
    digest = hashlib.md5(data).digest()
    assert md5_matches(data, digest.hex())
    assert md5_matches(data, digest.hex().upper())
    assert md5_matches(data, base64.b64encode(digest).decode())
    assert not md5_matches(data, hashlib.md5(b"other").hexdigest())
    assert not md5_matches(data, "garbage!")


def test_storage_paths_stay_inside_the_root(tmp_path) -> None:
    root = tmp_path / "store"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"a")
    os.symlink("/etc", root / "escape")
    base = "file://" + str(root)
    assert resolve_in_root(base, "docs/a.txt") == f"file://{root}/docs/a.txt"
    assert resolve_in_root(base, f"file://{root}/docs/a.txt") == f"file://{root}/docs/a.txt"
    for bad in ("../secret", "docs/../../secret", "/etc/passwd", "file:///etc/passwd", "escape/passwd", "",
                "s3://bucket/x"):
        with pytest.raises(pipeline.PrepareError) as err:
            resolve_in_root(base, bad)
        assert not err.value.temporary


def test_remote_storage_paths_are_confined_too() -> None:
    assert resolve_in_root("s3://bucket/mail", "tenant/a.pdf") == "s3://bucket/mail/tenant/a.pdf"
    assert resolve_in_root("s3://bucket/mail", "s3://bucket/mail/x/y.pdf") == "s3://bucket/mail/x/y.pdf"
    for bad in ("../other/a.pdf", "s3://bucket/other/a.pdf", "gs://bucket/mail/a.pdf"):
        with pytest.raises(pipeline.PrepareError):
            resolve_in_root("s3://bucket/mail", bad)


def test_large_file_policy_parsing() -> None:
    assert LargeFilePolicy.of(None) == LargeFilePolicy()
    cfg = {"enabled": True, "max_size_mb": 0.5, "action": "REWRITE", "storage_url": "s3://b/p",
           "public_base_url": "https://files.example", "file_ttl_days": 2}
    p = LargeFilePolicy.of({"large_file_config_json": json.dumps(cfg)})
    assert (p.enabled, p.max_bytes, p.action, p.storage_url, p.ttl_days) == (True, 512 * 1024, "rewrite", "s3://b/p", 2)
    odd = LargeFilePolicy.of({"large_file_config_json": json.dumps({"enabled": 1, "action": "explode",
                                                                    "max_size_mb": "x"})})
    assert odd.action == "warn" and odd.max_bytes == 10 * 1024 * 1024
    assert LargeFilePolicy.of({"large_file_config_json": "not json"}) == LargeFilePolicy()


def test_cache_is_bounded_and_keyed_per_tenant() -> None:
    c = ByteCache(400)
    k1, k2 = cache_key("t1", {"u": "x"}), cache_key("t2", {"u": "x"})
    assert k1 != k2
    c.put(k1, Fetched(b"a" * 90))
    c.put(k2, Fetched(b"b" * 90))
    assert c.get(k1).data == b"a" * 90 and c.get(k2).data == b"b" * 90
    c.put("big", Fetched(b"c" * 200))  # over a quarter of the cache: not kept
    assert c.get("big") is None
    for i in range(10):
        c.put(f"k{i}", Fetched(b"d" * 90))
    assert c.size <= 400 and c.get(k1) is None


def test_signed_links_round_trip_forgery_and_expiry() -> None:
    key = b"k" * 32
    link = signed_links.Link("t1", "file:///srv/f/x.bin", "x.bin", "application/pdf", 2_000_000_000)
    token = signed_links.sign(key, link)
    assert signed_links.verify(key, token, now=1_900_000_000) == link
    with pytest.raises(signed_links.ExpiredLink):
        signed_links.verify(key, token, now=2_000_000_001)
    with pytest.raises(signed_links.InvalidLink):
        signed_links.verify(b"other" * 8, token)
    body, sig = token.split(".")
    forged_claims = base64.urlsafe_b64encode(json.dumps(
        {"t": "t1", "u": "file:///etc/passwd", "f": "p", "m": None, "e": 2_000_000_000}).encode()).decode().rstrip("=")
    for bad in (forged_claims + "." + sig, body + "." + sig[:-2], "", "a.b.c", "!!!.???", "x" * 5000):
        with pytest.raises(signed_links.InvalidLink):
            signed_links.verify(key, bad)


def test_download_links_are_added_to_text_and_html() -> None:
    msg = {"body_text": "Hello", "body_html": "<html><body><p>Hello</p></body></html>"}
    p = Prepared({"filename": "big <1>.bin"}, None, link="https://pb.example/files/abc?x=1&y=2", size=3 * 1024 * 1024)
    out = with_links(msg, [p])
    assert out["body_text"].startswith("Hello") and "https://pb.example/files/abc?x=1&y=2" in out["body_text"]
    assert "3.0 MB" in out["body_text"]
    assert out["body_html"].endswith("</body></html>")
    assert 'href="https://pb.example/files/abc?x=1&amp;y=2"' in out["body_html"]
    assert "big &lt;1&gt;.bin" in out["body_html"]
    html_only = with_links({"body_text": None, "body_html": "<p>x</p>"}, [p])
    assert html_only["body_text"] is None and "files/abc" in html_only["body_html"]
    assert with_links(msg, []) is msg


def test_attachment_auth_is_validated_and_encrypted() -> None:
    from services.api.message_validation import Rejected, validate_message

    def make(auth: object, encrypt: object = lambda s: "ENC(" + s + ")") -> dict:
        raw = {"id": "m", "tenant_id": "t", "account_id": "a", "from": "a@b.test", "to": "c@d.test", "subject": "s",
               "attachments": [{"filename": "f.pdf", "storage_path": "https://x.test/f.pdf", "auth": auth}]}
        return validate_message(raw, default_priority=2, account_exists=lambda t, a: True,
                                tenant_exists=lambda t: True, encrypt=encrypt)  # type: ignore[arg-type]

    got = make({"method": "bearer", "token": "tok"})["attachments"][0]["auth"]
    assert got == {"method": "bearer", "user": None, "secret_enc": "ENC(tok)"}
    got = make({"method": "basic", "user": "u", "password": "p"})["attachments"][0]["auth"]
    assert got == {"method": "basic", "user": "u", "secret_enc": "ENC(p)"}
    assert make(None)["attachments"][0]["auth"] is None
    for bad in ({"method": "bearer"}, {"method": "basic", "password": "p"}, {"method": "digest", "token": "x"},
                "token", {"method": "bearer", "token": "a\r\nb"}):
        with pytest.raises(Rejected):
            make(bad)
    with pytest.raises(Rejected, match="not accepted"):
        make({"method": "bearer", "token": "tok"}, encrypt=None)


# --- storage roots are operator configuration (services/common/storage_roots.py) -----------------------

def _roots_settings(tmp_path, **kw):
    from services.common.settings import Settings
    return Settings(state_dir=tmp_path, **kw)


@pytest.mark.parametrize(("url", "code"), [
    ("simplecache::file:///", "storage_url_not_allowed"), ("filecache::s3://b/p", "storage_url_not_allowed"),
    ("file::simplecache::/etc", "storage_url_not_allowed"), ("file:///", "storage_url_not_allowed"),
    ("/", "storage_url_not_allowed"),
    ("memory://x", "storage_url_not_allowed"), ("ftp://h/p", "storage_url_not_allowed"),
    ("github://o:r@main/", "storage_url_not_allowed"), ("s3://AKIA:secret@bucket/p", "credentials_in_url"),
    ("https://u:p@files.example/x", "credentials_in_url"), ("az://c/p?sig=abc", "credentials_in_url"),
    ("relative/path", "invalid_storage_url"), ("file://host/etc", "invalid_storage_url"),
    ("s3://b/../x", "invalid_storage_url")])
def test_storage_urls_are_refused(url: str, code: str) -> None:
    from services.common.storage_roots import StorageRootError, normalise
    with pytest.raises(StorageRootError) as err:
        normalise(url)
    assert err.value.code == code
    assert "secret" not in err.value.message and "sig=" not in err.value.message


def test_raw_local_roots_must_lie_under_an_allowed_folder(tmp_path) -> None:
    from services.common.storage_roots import StorageRootError, check_raw_root
    s = _roots_settings(tmp_path)
    (tmp_path / "files" / "acme").mkdir(parents=True)
    os.symlink("/etc", tmp_path / "files" / "etc-link")
    assert check_raw_root(f"file://{tmp_path}/files/acme", s) == f"file://{tmp_path}/files/acme"
    for bad in ("file:///etc", f"file://{tmp_path}", f"file://{tmp_path}/files/../x", f"file://{tmp_path}/files/etc-link"):
        with pytest.raises(StorageRootError) as err:
            check_raw_root(bad, s)
        assert err.value.code == "storage_url_not_allowed"


def test_named_roots_placeholder_and_tenant_restriction(tmp_path) -> None:
    from services.common.storage_roots import StorageRootError, operator_roots, tenant_root_url
    roots = json.dumps({"shared": "file:///srv/pb/{tenant_id}", "vip": {"url": "s3://bucket/vip", "tenants": ["t1"]}})
    s = _roots_settings(tmp_path, storage_roots_json=roots, attachments_storage_url="s3://bucket/default")
    assert set(operator_roots(s)) == {"shared", "vip", "default"}
    assert tenant_root_url({"storage_root": "shared"}, "t2", s) == "file:///srv/pb/t2"
    assert tenant_root_url({"storage_root": "vip"}, "t1", s) == "s3://bucket/vip"
    assert tenant_root_url({}, "t2", s) == "s3://bucket/default"
    for cfg, tid in (({"storage_root": "vip"}, "t2"), ({"storage_root": "nope"}, "t1")):
        with pytest.raises(StorageRootError) as err:
            tenant_root_url(cfg, tid, s)
        assert err.value.code == "unknown_storage_root"
    assert tenant_root_url({}, "t1", _roots_settings(tmp_path)) is None  # no default root: no storage
    bad = _roots_settings(tmp_path, storage_roots_json=json.dumps({"x": "simplecache::file:///srv"}))
    with pytest.raises(StorageRootError) as err:
        operator_roots(bad)
    assert err.value.code == "storage_roots_misconfigured"


def test_chained_or_foreign_storage_paths_stay_refused(tmp_path) -> None:
    base = "file://" + str(tmp_path)
    for bad in ("simplecache::file:///etc/hostname", "x::y", "a\\..\\..\\etc", "http://127.0.0.1/x"):
        with pytest.raises(pipeline.PrepareError):
            resolve_in_root(base, bad)
    # an http(s) root keeps the path a path: no query or fragment injected into the root's server
    assert resolve_in_root("https://files.example/pre", "a b?x=1#f") == "https://files.example/pre/a%20b%3Fx%3D1%23f"


def test_download_urls_must_be_storage_objects(tmp_path) -> None:
    from services.common.storage_roots import StorageRootError, check_download_url
    s = _roots_settings(tmp_path)
    (tmp_path / "files" / "a").mkdir(parents=True)
    assert check_download_url(f"file://{tmp_path}/files/a/x.bin", s) == f"file://{tmp_path}/files/a/x.bin"
    for bad in ("file:///etc/passwd", "simplecache::file:///etc/passwd", "http://169.254.169.254/x",
                f"file://{tmp_path}/files"):
        with pytest.raises(StorageRootError):
            check_download_url(bad, s)


def test_an_ipv6_http_root_is_not_a_protocol_chain() -> None:
    from services.common.storage_roots import has_chain, normalise
    assert normalise("http://[::1]:8080/pre/") == "http://[::1]:8080/pre"  # the network policy decides
    assert not has_chain("https://[2001:db8::1]/x")
    assert has_chain("http://[::1]/a::b") and has_chain("s3://[::1]/x") and has_chain("simplecache::file:///")
