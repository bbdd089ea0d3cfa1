"""The field-ownership tables (services/api/field_policy.py) and the URL checks of tenant records
(services/api/url_checks.py), without a running system."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from services.api import field_policy, url_checks
from services.api.commands import Actor
from services.api.errors import ApiError
from services.api.models import AccountIn, InstanceIn, LargeFileConfig, TenantIn, TenantUpdate
from services.api.routes_domains import OutboundUpdate
from services.common.settings import Settings

TENANT = Actor("tenant", "t1", "k1")
ADMIN = Actor("admin")


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        out.add(prefix + name)
        if info.annotation is LargeFileConfig | None:
            out |= _fields(LargeFileConfig, prefix + name + ".")
    return out


@pytest.mark.parametrize(("resource", "models"), [
    ("tenant", (TenantIn, TenantUpdate)), ("account", (AccountIn,)), ("domain", (OutboundUpdate,)),
    ("instance", (InstanceIn,))])
def test_every_request_field_is_classified(resource: str, models: tuple[type[BaseModel], ...]) -> None:
    table = field_policy.TABLES[resource]
    for model in models:
        leaves = {f for f in _fields(model) if not any(k.startswith(f + ".") for k in table)}
        assert leaves <= set(table), f"{model.__name__}: unclassified {sorted(leaves - set(table))}"


@pytest.mark.parametrize("body", [{"rate_limits": {"hourly": 1}}, {"rate_limits": None}, {"active": True},
                                  {"large_file_config": {"storage_url": "file:///srv/x"}},
                                  {"name": "x", "active": False}])
def test_admin_only_tenant_fields_are_refused_for_a_tenant_key(body: dict) -> None:
    model = TenantUpdate(**body)
    with pytest.raises(ApiError) as err:
        field_policy.check_write("tenant", TENANT, model)
    assert (err.value.status, err.value.code) == (403, "admin_only_field")
    assert err.value.details["fields"] and all(f.split(".")[0] in body for f in err.value.details["fields"])
    field_policy.check_write("tenant", ADMIN, model)  # the admin may


def test_tenant_writable_fields_pass() -> None:
    body = TenantUpdate(name="n", client_sync_path="/s", tracking={"opens": True},
                        large_file_config={"enabled": True, "max_size_mb": 2, "action": "rewrite",
                                           "storage_root": "shared", "file_ttl_days": 3})
    field_policy.check_write("tenant", TENANT, body)
    field_policy.check_write("domain", TENANT, OutboundUpdate())
    field_policy.check_write("domain", TENANT, OutboundUpdate(tenant_id="t1"))
    for field in ("outbound_daily_limit", "outbound_monthly_limit", "outbound_tier", "outbound_enforcement",
                  "outbound_status"):
        value = {"outbound_tier": "dedicated", "outbound_enforcement": "hard",
                 "outbound_status": "active"}.get(field, 5)
        with pytest.raises(ApiError) as err:
            field_policy.check_write("domain", TENANT, OutboundUpdate(**{field: value}))
        assert err.value.details == {"fields": [field]}


def test_a_tenant_rewriting_large_file_config_keeps_the_admin_storage_url() -> None:
    stored = {"enabled": True, "storage_url": "file:///srv/a", "junk": 1}
    new = {"enabled": False, "storage_root": "shared"}
    assert field_policy.keep_admin_subfields("tenant", "large_file_config", new, stored, TENANT) == \
        {"enabled": False, "storage_root": "shared", "storage_url": "file:///srv/a"}
    assert field_policy.keep_admin_subfields("tenant", "large_file_config", None, stored, TENANT) == \
        {"storage_url": "file:///srv/a"}
    assert field_policy.keep_admin_subfields("tenant", "large_file_config", new, stored, ADMIN) == new


def test_table_markdown_lists_every_resource() -> None:
    text = field_policy.table_markdown()
    assert all(f"| {r} |" in text for r in field_policy.TABLES) and "`rate_limits`" in text


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(state_dir=tmp_path, **kw)


@pytest.mark.parametrize(("url", "code"), [
    ("http://127.0.0.1:8010/", "url_not_allowed"), ("http://[::1]/", "url_not_allowed"),
    ("http://[::ffff:127.0.0.1]/", "url_not_allowed"), ("http://169.254.169.254/", "url_not_allowed"),
    ("http://10.0.0.1/", "url_not_allowed"), ("http://2130706433/", "url_not_allowed"),
    ("http://0x7f000001/", "url_not_allowed"), ("http://localhost:9/", "url_not_allowed"),
    ("https://user:pw@example.com/", "credentials_in_url"), ("ftp://example.com/", "url_not_allowed")])
def test_client_base_url_refusals(tmp_path: Path, url: str, code: str) -> None:
    with pytest.raises(ApiError) as err:
        url_checks.check_client_base_url(url, _settings(tmp_path))
    assert (err.value.status, err.value.code, err.value.details) == (422, code, {"field": "client_base_url"})
    assert "pw" not in err.value.message


def test_client_base_url_allowed_by_the_operator_policy(tmp_path: Path) -> None:
    url_checks.check_client_base_url("https://example.com/", _settings(tmp_path))
    listed = _settings(tmp_path, allowed_private_networks="127.0.0.2/32")
    url_checks.check_client_base_url("http://127.0.0.2:81/", listed)
    url_checks.check_client_base_url("http://127.0.0.1:81/", _settings(tmp_path, allow_private_networks=True))


@pytest.mark.parametrize("path", ["//evil.example/x", "http://evil/x", "/a?token=1", "/a#f", "/a\\b", "sync", ""])
def test_paths_must_be_paths(path: str) -> None:
    with pytest.raises(ApiError) as err:
        url_checks.check_client_path(path, "client_sync_path")
    assert (err.value.code, err.value.details) == ("invalid_path", {"field": "client_sync_path"})
    url_checks.check_client_path("/mail-proxy/sync", "client_sync_path")


def test_attachment_urls_with_credentials_are_rejected() -> None:
    from services.api.message_validation import Rejected, _attachments
    for path in ("https://user:topsecret@files.example/a.pdf", "s3://KEY:topsecret@bucket/a.pdf"):
        with pytest.raises(Rejected) as err:
            _attachments([{"filename": "a.pdf", "storage_path": path}])
        assert "credentials" in str(err.value) and "topsecret" not in str(err.value)
    assert _attachments([{"filename": "a.pdf", "storage_path": "https://files.example/a.pdf?X-Amz-Signature=1"}])


def test_admin_http_storage_roots_pass_the_literal_network_check(tmp_path: Path) -> None:
    for url in ("http://169.254.169.254/", "http://127.0.0.1:8010/", "http://[::1]/"):
        with pytest.raises(ApiError) as err:
            url_checks.check_large_file_config({"storage_url": url}, "t1", _settings(tmp_path))
        assert (err.value.code, err.value.details) == ("url_not_allowed", {"field": "large_file_config.storage_url"})
    url_checks.check_large_file_config({"storage_url": "https://files.example/pre"}, "t1", _settings(tmp_path))
