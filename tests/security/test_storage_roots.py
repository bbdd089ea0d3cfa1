"""Finding 1 (critical): server files and internal URLs through ``large_file_config.storage_url``.

Before the fix a tenant key could ``PUT /tenant/{id}`` with ``{"large_file_config": {"storage_url":
"simplecache::file:///"}}`` and then queue a ``storage`` attachment ``etc/hostname`` (or
``proc/self/environ``): the server's file arrived as an attachment. Now storage roots are operator
configuration (``POSTBUS_STORAGE_ROOTS_JSON``; the secure system defines ``shared`` = one folder per
tenant, and ``vip`` that no tenant may choose): a tenant picks a root by name, a raw ``storage_url`` is
admin-only, and even the admin's value is validated (no protocol chains, allowed protocols, no
credentials, local folders under the allowed ones, http(s) under the network policy)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until
from tests.support.smtp_server import RecordingSmtpServer

SECRET = b"server-secret-" + uuid.uuid4().hex.encode()


def _attacks(system: LocalSystem) -> list[str]:
    return ["simplecache::file:///", "filecache::file:///", "file:///", "file:///etc",
            f"http://127.0.0.1:{system.ports['metrics']}/", "http://169.254.169.254/latest/meta-data/",
            f"file://{system.state_dir}/files"]


def _log_count(admin: httpx.Client, tenant_id: str) -> int:
    r = admin.get("/command-log", params={"tenant_id": tenant_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


def _lfc(http: httpx.Client, tenant_id: str) -> object:
    return http.get(f"/tenant/{tenant_id}").json()["large_file_config"]


def test_a_tenant_key_cannot_set_a_storage_url(secure_system: LocalSystem, secure_admin: httpx.Client,
                                               secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    # positive control: the tenant may write large_file_config, and the write is in the command log
    before = _log_count(secure_admin, t.id)
    r = t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"enabled": True, "storage_root": "shared"}})
    assert r.status_code == 200, r.text
    assert _log_count(secure_admin, t.id) == before + 1
    stored = _lfc(t.http, t.id)
    assert stored == {"enabled": True, "storage_root": "shared"}

    count = _log_count(secure_admin, t.id)
    for url in _attacks(secure_system):
        r = t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_url": url}})
        assert r.status_code == 403, (url, r.text)
        err = r.json()["error"]
        assert err["code"] == "admin_only_field" and err["details"] == {"fields": ["large_file_config.storage_url"]}
        assert url not in r.text
        assert _lfc(t.http, t.id) == stored, url  # nothing written
    assert _log_count(secure_admin, t.id) == count  # no command appended


@pytest.mark.parametrize(("url", "code"), [
    ("simplecache::file:///", "storage_url_not_allowed"),
    ("filecache::file:///", "storage_url_not_allowed"),
    ("file:///", "storage_url_not_allowed"),
    ("file:///etc", "storage_url_not_allowed"),
    ("METRICS", "url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "url_not_allowed"),
    ("http://[::1]/", "url_not_allowed"),
    ("memory://x", "storage_url_not_allowed"),
    ("s3://AKIAEXAMPLE:topsecret@bucket/prefix", "credentials_in_url"),  # finding 11
    ("https://files.example/x?sig=topsecret", "credentials_in_url"),
])
def test_even_the_admin_storage_url_is_validated(secure_system: LocalSystem, secure_admin: httpx.Client,
                                                 secure_tenant: Callable[..., Tenant], url: str, code: str) -> None:
    t = secure_tenant()
    url = url.replace("METRICS", f"http://127.0.0.1:{secure_system.ports['metrics']}/")
    good = f"file://{secure_system.state_dir}/files/{t.id}"
    # positive control: an admin root under the allowed folder is accepted
    r = secure_admin.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_url": good}})
    assert r.status_code == 200, r.text
    count = _log_count(secure_admin, t.id)
    r = secure_admin.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_url": url}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["details"] == {"field": "large_file_config.storage_url"}, r.text
    assert "topsecret" not in r.text
    assert _lfc(secure_admin, t.id) == {"storage_url": good}
    assert _log_count(secure_admin, t.id) == count


def test_a_tenant_picks_only_roots_it_may_have(secure_system: LocalSystem, secure_admin: httpx.Client,
                                              secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    assert t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_root": "shared"}}).status_code == 200
    for name in ("vip", "nope"):
        r = t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_root": name}})
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_storage_root", r.text
        assert r.json()["error"]["details"] == {"field": "large_file_config.storage_root"}
    assert _lfc(t.http, t.id) == {"storage_root": "shared"}
    # a tenant rewriting its config keeps the admin's storage_url (it could not name it)
    good = f"file://{secure_system.state_dir}/files/{t.id}"
    assert secure_admin.put(f"/tenant/{t.id}", json={"large_file_config": {"storage_url": good}}).status_code == 200
    r = t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"enabled": True, "storage_root": "shared"}})
    assert r.status_code == 200, r.text
    assert _lfc(t.http, t.id) == {"enabled": True, "storage_root": "shared", "storage_url": good}


def _mail(smtp: RecordingSmtpServer, tenant_id: str, mid: str) -> EmailMessage | None:
    for m in smtp.messages:
        if m.message["X-Postbus-Tenant"] == tenant_id and m.message["X-Postbus-Message-Id"] == mid:
            return m.message
    return None


def _final(t: Tenant, mid: str) -> dict:
    return t.client.wait_for_report(lambda r: r.get("id") == mid and ("sent_ts" in r or "error_ts" in r), 90)


def _storage(mid_path: str) -> dict:
    return {"filename": "f.txt", "storage_path": mid_path, "fetch_mode": "storage"}


def test_storage_attachments_never_leave_the_tenants_root(secure_system: LocalSystem,
                                                           secure_tenant: Callable[..., Tenant],
                                                           secure_smtp: RecordingSmtpServer) -> None:
    t = secure_tenant(large_file_config={"storage_root": "shared"})
    roots = Path(secure_system.state_dir) / "roots"
    (roots / t.id).mkdir(parents=True)
    (roots / t.id / "hello.txt").write_bytes(b"hello from the tenant's root")
    (roots / "vip").mkdir(parents=True, exist_ok=True)
    (roots / "vip" / "secret.txt").write_bytes(SECRET)
    (roots / "other-tenant").mkdir(parents=True, exist_ok=True)
    (roots / "other-tenant" / "secret.txt").write_bytes(SECRET)
    (Path(secure_system.state_dir) / "secret.txt").write_bytes(SECRET)
    # a second tenant without any root (the secure system has no default root)
    u = secure_tenant()

    # positive control: a file in the tenant's operator root is delivered
    ok = {"filename": "hello.txt", "storage_path": "hello.txt", "fetch_mode": "storage", "mime_type": "text/plain"}
    r = t.http.post("/commands/add-messages", json={"messages": [t.message("ok", attachments=[ok])]})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text
    assert "sent_ts" in _final(t, "ok"), t.client.reports_for("ok")
    msg = wait_until(lambda: _mail(secure_smtp, t.id, "ok"), timeout=60, what="the positive control mail")
    assert {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()} == \
        {"hello.txt": b"hello from the tenant's root"}

    state = str(secure_system.state_dir)
    paths = {"dotdot-vip": "../vip/secret.txt", "dotdot-other": "../other-tenant/secret.txt",
             "dotdot-state": "../../secret.txt", "deep": "../../../../../../../../etc/hostname",
             "abs": "/etc/hostname", "abs-state": f"{state}/secret.txt", "file-url": "file:///etc/hostname",
             "chain": "simplecache::file:///etc/hostname", "filecache": "filecache::file:///proc/self/environ",
             "http": f"http://127.0.0.1:{secure_system.ports['metrics']}/health", "environ": "proc/self/environ"}
    attacks = [t.message(mid, attachments=[_storage(p)]) for mid, p in paths.items()]
    attacks.append(u.message("no-root", attachments=[_storage("etc/hostname")]))
    for tenant, batch in ((t, attacks[:-1]), (u, attacks[-1:])):
        r = tenant.http.post("/commands/add-messages", json={"messages": batch})
        assert r.status_code == 200 and r.json()["queued"] == len(batch), r.text
    for mid in paths:
        final = _final(t, mid)
        assert "error_ts" in final, (mid, final)
        assert "storage" in final["error"], (mid, final)
    assert "no storage root" in _final(u, "no-root")["error"]
    # nothing was sent for any of them, and no mail carries a server file
    for mid in paths:
        assert _mail(secure_smtp, t.id, mid) is None, mid
    assert _mail(secure_smtp, u.id, "no-root") is None
    # no mail of these tenants carries a server file
    hostname = Path("/etc/hostname").read_bytes().strip() if Path("/etc/hostname").exists() else b""
    for m in secure_smtp.messages:
        if m.message["X-Postbus-Tenant"] in (t.id, u.id):
            for part in m.message.iter_attachments():
                payload = part.get_payload(decode=True) or b""
                assert SECRET not in payload and not (hostname and hostname in payload), part.get_filename()
    assert SECRET not in b"".join(m.data for m in secure_smtp.messages)
