"""Storage roots of the ``storage`` attachment mode and of large-file uploads: operator configuration.

The operator defines named roots (``POSTBUS_STORAGE_ROOTS_JSON``); ``POSTBUS_ATTACHMENTS_STORAGE_URL``
is the root named ``default`` unless the JSON names one. A tenant chooses a root only by name
(``large_file_config.storage_root``); a raw ``large_file_config.storage_url`` is an admin-only field.
Every root URL, the operator's and the admin's, passes :func:`parse_url`:

- no fsspec protocol chains (``simplecache::file://``, ``filecache::...``): they hide the real target;
- only the protocols of :data:`ALLOWED_PROTOCOLS`; a bare absolute path is a ``file`` root;
- no credentials: no ``user:password@`` and no query string or fragment (signed tokens, SAS keys).
  Object-store credentials and endpoints come from the operator's environment (boto3/gcsfs/adlfs
  standard chains), never from a URL;
- a local root is never ``/``; a raw (admin) local root must lie under an allowed folder
  (``POSTBUS_ATTACHMENTS_FILE_ROOTS``, default ``<state_dir>/files``, plus the operator's named roots).

``{tenant_id}`` in a root URL is replaced by the tenant's id (one prefix per tenant in a shared bucket).
A named root may be limited to some tenants: ``{"name": {"url": "...", "tenants": ["t1", "t2"]}}``.

Shared by the API (validation at write time, 422) and the sender (checked again at fetch time)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

ALLOWED_PROTOCOLS = frozenset({"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})
HTTP_PROTOCOLS = frozenset({"http", "https"})
ROOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PROTOCOL = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
TENANT_PLACEHOLDER = "{tenant_id}"


class StorageRootError(ValueError):
    """A storage root or path that is not acceptable; ``code`` is the API's stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Root:
    name: str
    url: str
    tenants: frozenset[str] | None = None  # None: every tenant may choose it

    def allows(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants


_IPV6_HOST = re.compile(r"^(https?://)\[[0-9A-Fa-f:.]+\]", re.IGNORECASE)


def has_chain(url: str) -> bool:
    """An fsspec protocol chain (``a::b://``): ``::`` anywhere but in an http(s) IPv6 host literal."""
    return "::" in _IPV6_HOST.sub(r"\1", url)


def parse_url(url: Any) -> tuple[str, str]:
    """``(protocol, rest)`` of a storage root URL; ``rest`` of a file root is an absolute path.
    Raises :class:`StorageRootError` (messages never repeat the URL: it may hold a secret)."""
    if not isinstance(url, str) or not url.strip():
        raise StorageRootError("invalid_storage_url", "the storage URL is empty")
    if len(url) > 2000 or any(ord(c) < 32 or ord(c) == 127 for c in url) or "\\" in url:
        raise StorageRootError("invalid_storage_url", "the storage URL holds control characters or backslashes")
    if has_chain(url):
        raise StorageRootError("storage_url_not_allowed", "protocol chains (::) are not allowed in storage URLs")
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = proto.lower()
    elif url.startswith("/"):
        proto, rest = "file", url
    else:
        raise StorageRootError("invalid_storage_url", "a storage URL is an absolute path or protocol://...")
    if not _PROTOCOL.match(proto) or proto not in ALLOWED_PROTOCOLS:
        raise StorageRootError("storage_url_not_allowed",
                               f"storage protocol not allowed (allowed: {', '.join(sorted(ALLOWED_PROTOCOLS))})")
    if "?" in rest or "#" in rest:
        raise StorageRootError("credentials_in_url", "storage URLs must not carry a query string or fragment "
                                                     "(credentials come from the operator's environment)")
    if proto == "file":
        if not rest.startswith("/"):
            raise StorageRootError("invalid_storage_url", "a file:// storage URL needs an absolute path (file:///...)")
        if os.path.normpath(rest) == "/":
            raise StorageRootError("storage_url_not_allowed", "the filesystem root is not a storage root")
        return proto, rest
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        raise StorageRootError("credentials_in_url", "storage URLs must not carry credentials (user:password@)")
    if not netloc:
        raise StorageRootError("invalid_storage_url", "the storage URL has no bucket or host")
    if ".." in rest.split("/"):
        raise StorageRootError("invalid_storage_url", "the storage URL must not contain '..'")
    return proto, rest


def normalise(url: str) -> str:
    """The canonical form of a root URL (``file://<realpath>`` for local roots)."""
    proto, rest = parse_url(url)
    if proto == "file":
        real = os.path.realpath(rest)
        if real == "/":
            raise StorageRootError("storage_url_not_allowed", "the filesystem root is not a storage root")
        return "file://" + real
    return f"{proto}://{rest.rstrip('/')}"


def is_local(url: str) -> bool:
    return parse_url(url)[0] == "file"


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


_cache: dict[tuple[str, str | None], dict[str, Root]] = {}


def operator_roots(settings: Any) -> dict[str, Root]:
    """The operator's named roots. Raises :class:`StorageRootError` on a bad configuration."""
    key = (settings.storage_roots_json or "", settings.attachments_storage_url)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        data = json.loads(key[0] or "{}")
    except ValueError:
        raise StorageRootError("storage_roots_misconfigured", "POSTBUS_STORAGE_ROOTS_JSON is not JSON") from None
    if not isinstance(data, dict):
        raise StorageRootError("storage_roots_misconfigured", "POSTBUS_STORAGE_ROOTS_JSON must be an object")
    roots: dict[str, Root] = {}
    for name, spec in data.items():
        tenants = None
        if isinstance(spec, dict):
            url = spec.get("url")
            if spec.get("tenants") is not None:
                if not isinstance(spec["tenants"], list) or not all(isinstance(t, str) for t in spec["tenants"]):
                    raise StorageRootError("storage_roots_misconfigured", f"storage root {name!r}: bad tenants list")
                tenants = frozenset(spec["tenants"])
        else:
            url = spec
        if not ROOT_NAME.match(str(name)):
            raise StorageRootError("storage_roots_misconfigured", f"invalid storage root name {name!r}")
        try:
            parse_url(str(url).replace(TENANT_PLACEHOLDER, "t"))
        except StorageRootError as exc:
            raise StorageRootError("storage_roots_misconfigured", f"storage root {name!r}: {exc.message}") from None
        roots[name] = Root(name, str(url), tenants)
    if settings.attachments_storage_url and "default" not in roots:
        parse_url(settings.attachments_storage_url.replace(TENANT_PLACEHOLDER, "t"))
        roots["default"] = Root("default", settings.attachments_storage_url)
    _cache[key] = roots
    return roots


def allowed_folders(settings: Any) -> list[str]:
    """Local folders a raw (admin) ``file://`` root may point into."""
    folders = [r.strip() for r in (settings.attachments_file_roots or "").split(",") if r.strip()]
    if not folders:
        folders = [str(settings.state_dir / "files")]
    try:
        named = operator_roots(settings).values()
    except StorageRootError:
        named = []
    for root in named:
        try:
            proto, rest = parse_url(root.url.split(TENANT_PLACEHOLDER, 1)[0])
        except StorageRootError:
            continue
        if proto == "file":
            folders.append(rest)  # the operator's own roots are trusted
    return [os.path.realpath(f) for f in folders if os.path.realpath(f) != "/"]


def check_raw_root(url: str, settings: Any) -> str:
    """An admin-set raw root URL, validated and normalised; a local one must lie under an allowed folder."""
    norm = normalise(url)
    if norm.startswith("file://"):
        real = norm.removeprefix("file://")
        if not any(_within(real, folder) for folder in allowed_folders(settings)):
            raise StorageRootError("storage_url_not_allowed",
                                   "storage_url points to a local folder that is not an allowed storage root")
    return norm


def check_root_name(name: str, tenant_id: str, settings: Any) -> Root:
    """The operator root ``name`` if this tenant may use it."""
    root = operator_roots(settings).get(name)
    if root is None or not root.allows(tenant_id):
        raise StorageRootError("unknown_storage_root", "no storage root of that name is available to this tenant")
    return root


def tenant_root_url(cfg: dict[str, Any], tenant_id: str, settings: Any) -> str | None:
    """The storage root URL a tenant's attachments and uploads use, normalised (None: no root).

    Order: the admin-set ``storage_url``; the chosen ``storage_root``; the operator's ``default``."""
    raw = cfg.get("storage_url")
    if raw is not None:
        if not isinstance(raw, str):
            raise StorageRootError("invalid_storage_url", "storage_url must be a string")
        return check_raw_root(raw, settings)
    name = cfg.get("storage_root")
    if name is not None:
        root = check_root_name(str(name), tenant_id, settings)
    else:
        root = operator_roots(settings).get("default")
        if root is None or not root.allows(tenant_id):
            return None
    return normalise(root.url.replace(TENANT_PLACEHOLDER, tenant_id))


def check_download_url(url: str, settings: Any) -> str:
    """A stored object's URL taken from a signed link (defence in depth: the signature is the
    authorisation, but the URL must still be a storage object the sender could have written)."""
    proto, _ = parse_url(url)
    if proto in HTTP_PROTOCOLS:
        raise StorageRootError("storage_url_not_allowed", "downloads are never served from http(s) roots")
    if proto == "file":
        real = os.path.realpath(url.removeprefix("file://"))
        if not any(_within(real, folder) and real != folder for folder in allowed_folders(settings)):
            raise StorageRootError("storage_url_not_allowed", "the file is outside every storage root")
        return "file://" + real
    return url
