"""Findings 2 (API half) and 11: the callback URLs of a tenant record are checked when written.

``client_base_url`` naming a literal loopback, private, link-local, IPv4-mapped or integer-encoded
address, or ``localhost``, is refused with 422 ``url_not_allowed`` unless the operator's network
policy allows it (the secure system lists only 127.0.0.2); credentials in it are refused with 422
``credentials_in_url`` and never echoed; ``client_sync_path`` / ``client_attachment_path`` must be paths
(422 ``invalid_path``). Nothing is written. Names are checked again at every connection (see
test_callback_ssrf.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Tenant
from tests.security.conftest import ALLOWED_HOST

BAD_BASE_URLS = [
    ("http://127.0.0.1:{port}", "url_not_allowed"),
    ("http://[::1]:{port}", "url_not_allowed"),
    ("http://[::ffff:127.0.0.1]:{port}", "url_not_allowed"),
    ("http://169.254.169.254", "url_not_allowed"),
    ("http://10.0.0.1:{port}", "url_not_allowed"),
    ("http://2130706433:{port}", "url_not_allowed"),
    ("http://0x7f000001:{port}", "url_not_allowed"),
    ("http://localhost:{port}", "url_not_allowed"),
    ("http://sync-user:topsecret@" + ALLOWED_HOST + ":{port}", "credentials_in_url"),
]

BAD_PATHS = ["//evil.example/sync", "http://evil.example/sync", "/sync?token=topsecret", "/sync#frag",
             "/\\evil.example/sync"]


def _log_count(admin: httpx.Client, tenant_id: str) -> int:
    r = admin.get("/command-log", params={"tenant_id": tenant_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


@pytest.mark.parametrize(("template", "code"), BAD_BASE_URLS)
def test_client_base_url_refused_at_the_api(secure_admin: httpx.Client, secure_tenant: Callable[..., Tenant],
                                            template: str, code: str) -> None:
    t = secure_tenant()
    url = template.format(port=t.client.port)
    good = f"http://{ALLOWED_HOST}:{t.client.port}"
    # control: the operator-listed address is accepted
    r = t.http.put(f"/tenant/{t.id}", json={"client_base_url": good + "/"})
    assert r.status_code == 200, r.text
    count = _log_count(secure_admin, t.id)
    for client in (t.http, secure_admin):  # the admin's value passes the same policy
        r = client.put(f"/tenant/{t.id}", json={"client_base_url": url})
        assert r.status_code == 422, (url, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["details"] == {"field": "client_base_url"}, r.text
        assert "topsecret" not in r.text
    assert t.http.get(f"/tenant/{t.id}").json()["client_base_url"] == good
    assert _log_count(secure_admin, t.id) == count  # nothing written


def test_a_new_tenant_with_a_loopback_callback_is_refused(secure_admin: httpx.Client) -> None:
    r = secure_admin.post("/tenant", json={"id": "loopback-cb", "client_base_url": "http://127.0.0.1:9/"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "url_not_allowed", r.text
    assert secure_admin.get("/tenant/loopback-cb").status_code == 404
    r = secure_admin.post("/tenant", json={"id": "userinfo-cb", "client_base_url": "https://u:topsecret@example.com/"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "credentials_in_url" and "topsecret" not in r.text
    assert secure_admin.get("/tenant/userinfo-cb").status_code == 404


@pytest.mark.parametrize("field", ["client_sync_path", "client_attachment_path"])
def test_callback_paths_must_be_paths(secure_admin: httpx.Client, secure_tenant: Callable[..., Tenant],
                                      field: str) -> None:
    t = secure_tenant()
    assert t.http.put(f"/tenant/{t.id}", json={field: "/hooks/x"}).status_code == 200  # control
    count = _log_count(secure_admin, t.id)
    for path in BAD_PATHS:
        r = t.http.put(f"/tenant/{t.id}", json={field: path})
        assert r.status_code == 422, (path, r.text)
        assert "topsecret" not in r.text
        if r.json()["error"]["code"] != "validation_error":  # "http://..." fails the model's pattern first
            assert r.json()["error"] == {**r.json()["error"], "code": "invalid_path", "details": {"field": field}}
    assert t.http.get(f"/tenant/{t.id}").json()[field] == "/hooks/x"
    assert _log_count(secure_admin, t.id) == count


def test_large_file_public_base_url_without_credentials(secure_tenant: Callable[..., Tenant]) -> None:
    t = secure_tenant()
    ok = {"large_file_config": {"public_base_url": "https://files.example.com"}}
    assert t.http.put(f"/tenant/{t.id}", json=ok).status_code == 200
    r = t.http.put(f"/tenant/{t.id}", json={"large_file_config": {"public_base_url": "https://u:topsecret@x.example"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "credentials_in_url", r.text
    assert "topsecret" not in r.text
    assert t.http.get(f"/tenant/{t.id}").json()["large_file_config"] == ok["large_file_config"]
