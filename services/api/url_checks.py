"""Checks of the URLs and storage settings a tenant record carries, at write time (422, stable codes).

- ``client_base_url``: http(s), no ``user:password@`` (``credentials_in_url``: use ``client_auth``),
  no literal loopback/private/link-local/mapped/integer address or ``localhost`` unless the operator's
  network policy allows it (``url_not_allowed``; services/common/netpolicy.py ``literal_refusal``).
  Names are resolved and checked again at every connection by the reporter and the sender.
- ``client_sync_path`` / ``client_attachment_path``: a path: starts with one ``/``, no scheme, host,
  ``//`` authority, backslash, query or fragment (``invalid_path``).
- ``large_file_config``: ``storage_url`` (admin-only) and ``storage_root`` through
  services/common/storage_roots.py; ``public_base_url`` http(s) without credentials.

Errors name the field (``details.field``) and never repeat the value: it may hold a secret."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from services.api.errors import ApiError
from services.common import storage_roots
from services.common.netpolicy import NetPolicy

_PATH = re.compile(r"^/(?!/)[^\s\\?#]*$")


def _refuse(code: str, field: str, why: str) -> ApiError:
    return ApiError(422, code, f"{field}: {why}", details={"field": field})


def _has_userinfo(url: str) -> bool:
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def check_client_base_url(url: str | None, settings: Any, field: str = "client_base_url") -> None:
    if url is None:
        return
    if _has_userinfo(url):
        raise _refuse("credentials_in_url", field, "must not carry credentials (user:password@); use client_auth")
    why = NetPolicy.from_settings(settings).literal_refusal(url)
    if why is not None:
        raise _refuse("url_not_allowed", field, why)


def check_client_path(path: str | None, field: str) -> None:
    if path is None:
        return
    if not _PATH.match(path):
        raise _refuse("invalid_path", field, "must be a path: one leading '/', no scheme, host, '//', "
                                             "backslash, query or fragment")


def check_public_base_url(url: Any, field: str = "large_file_config.public_base_url") -> None:
    if url is None:
        return
    try:
        parts = urlsplit(str(url))
    except ValueError:
        raise _refuse("invalid_url", field, "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse("invalid_url", field, "must be an http(s) URL")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise _refuse("credentials_in_url", field, "must not carry credentials, a query or a fragment")


def check_large_file_config(cfg: dict[str, Any] | None, tenant_id: str, settings: Any) -> None:
    if not cfg:
        return
    check_public_base_url(cfg.get("public_base_url"))
    if cfg.get("storage_url") is not None:
        field = "large_file_config.storage_url"
        try:
            root = storage_roots.check_raw_root(cfg["storage_url"], settings)
        except storage_roots.StorageRootError as exc:
            raise _refuse(exc.code, field, exc.message) from None
        if root.split("://", 1)[0] in storage_roots.HTTP_PROTOCOLS:  # fetched through the network policy
            why = NetPolicy.from_settings(settings).literal_refusal(root)
            if why is not None:
                raise _refuse("url_not_allowed", field, why)
    if cfg.get("storage_root") is not None:
        try:
            storage_roots.check_root_name(cfg["storage_root"], tenant_id, settings)
        except storage_roots.StorageRootError as exc:
            raise _refuse(exc.code, "large_file_config.storage_root", exc.message) from None


def check_tenant_fields(body: Any, tenant_id: str, settings: Any) -> None:
    """Every URL-ish field a tenant create/update sets (``body`` is a _TenantFields model)."""
    given = body.model_fields_set
    if "client_base_url" in given and body.client_base_url is not None:
        check_client_base_url(str(body.client_base_url), settings)
    for field in ("client_sync_path", "client_attachment_path"):
        if field in given:
            check_client_path(getattr(body, field), field)
    if "large_file_config" in given and body.large_file_config is not None:
        check_large_file_config(body.large_file_config.model_dump(exclude_unset=True), tenant_id, settings)
