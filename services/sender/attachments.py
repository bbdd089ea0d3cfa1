"""Attachment fetching for the sender: base64, http_url, endpoint and storage (fsspec) modes.

Safe by default:
- every HTTP fetch goes through the one network policy (``services/common/netpolicy.py``): every
  resolved address checked, the connection pinned to it, every redirect hop checked;
- ``storage`` roots are the operator's (services/common/storage_roots.py): a named root the tenant
  chose (``large_file_config.storage_root``), an admin-set ``storage_url``, or the operator's default;
  no protocol chains, allowed protocols only, a raw local root under an allowed folder; paths resolve
  inside the root (symlinks resolved); http(s) roots are fetched through the network policy;
- sizes are bounded while streaming, never after the fact.

Failures a retry can fix (timeouts, connection errors, 5xx, 408/429) raise
``PrepareError(temporary=True)``, so the sender retries them like SMTP temporary failures; 4xx, bad
checksums and policy refusals are permanent. Every fetch failure names the attachment
("Attachment fetch failed for <filename>: ...", as genro-mail-proxy 0.6 words it).

genro-mail-proxy 0.6 compatibility: a ``{MD5:<hex>}`` marker in ``filename`` (``report_{MD5:...}.pdf``)
is the cache key and is stripped from the name the recipient sees (``report.pdf``); without
``mime_type`` the type is the fetch's own Content-Type when it is specific, else guessed from the
file name (``mimetypes``), else ``application/octet-stream``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import mimetypes
import os
import posixpath
import re
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import fsspec
import httpx

from services.common import netpolicy, signed_links, storage_roots
from services.common.crypto import load_secret_box
from services.common.settings import Settings, get_settings
from services.sender import pipeline
from services.sender.mime import decode_base64_attachment

log = logging.getLogger("postbus.sender.attachments")
MB = 1024 * 1024
DEFAULT_ATTACHMENT_PATH = "/mail-proxy/attachments"
_MIME_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


# --- HTTP fetch (through the one network policy) ----------------------------------------------------

_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = netpolicy.client(get_settings().attachments_fetch_timeout_s)
    return _client


@dataclass
class Fetched:
    data: bytes
    content_type: str | None = None


async def http_fetch(method: str, url: str, *, limit: int, policy: netpolicy.NetPolicy,
                     headers: dict[str, str] | None = None, auth: httpx.Auth | None = None,
                     json_body: Any = None, follow: bool = True) -> Fetched:
    """One HTTP fetch under the network policy, the size limit applied while streaming."""
    try:
        async with policy.stream(_http(), method, url, headers=headers, auth=auth, json_body=json_body,
                                 follow=follow) as resp:
            if resp.is_redirect:
                raise pipeline.PrepareError(f"attachment fetch answered a redirect: {_safe(url)}")
            _check_status(resp.status_code, url)
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise TooLarge(limit)
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(limit)
                chunks.append(chunk)
            ctype = resp.headers.get("content-type", "").split(";")[0].strip() or None
            return Fetched(b"".join(chunks), ctype)
    except netpolicy.Refused as exc:
        raise pipeline.PrepareError(f"attachment fetch refused: {exc}") from None
    except netpolicy.Unreachable as exc:
        raise pipeline.PrepareError(f"attachment fetch failed: {exc}", temporary=True) from None


def _check_status(status: int, url: str) -> None:
    if 200 <= status < 300:
        return
    temporary = status >= 500 or status in (408, 425, 429)
    raise pipeline.PrepareError(f"attachment fetch answered HTTP {status}: {_safe(url)}", temporary=temporary)


_safe = netpolicy.safe_url


# --- storage (operator roots; fsspec for object stores) ---------------------------------------------------

def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_root(root: str, settings: Settings) -> str:
    """An admin-set raw root URL, normalised: no protocol chains, an allowed protocol, no credentials;
    a local root under an allowed folder (services/common/storage_roots.py)."""
    try:
        return storage_roots.check_raw_root(root, settings)
    except storage_roots.StorageRootError as exc:
        raise pipeline.PrepareError(f"storage_url refused: {exc.message}") from None


def tenant_root(tenant_id: str, policy: LargeFilePolicy, settings: Settings) -> str | None:
    """The tenant's storage root URL: the admin-set ``storage_url``, the chosen operator root
    (``storage_root``), or the operator's ``default`` root (None: no storage)."""
    cfg = {"storage_url": policy.storage_url, "storage_root": policy.storage_root}
    try:
        return storage_roots.tenant_root_url({k: v for k, v in cfg.items() if v is not None}, tenant_id, settings)
    except storage_roots.StorageRootError as exc:
        raise pipeline.PrepareError(f"storage refused: {exc.message}") from None


def resolve_in_root(root_url: str, storage_path: str) -> str:
    """The full URL of ``storage_path`` (relative to the root, or a URL/absolute path inside it)."""
    outside = pipeline.PrepareError("attachment storage_path is outside the configured storage")
    if "::" in storage_path or "\\" in storage_path or any(ord(c) < 32 for c in storage_path):
        raise outside
    proto, root = fsspec.core.split_protocol(root_url)
    given_proto, given = fsspec.core.split_protocol(storage_path)
    if given_proto is not None and (given_proto != proto and not (_is_local(given_proto) and _is_local(proto))):
        raise outside
    if _is_local(proto):
        candidate = given if given_proto is not None or os.path.isabs(given) else os.path.join(root, given)
        real = os.path.realpath(candidate)
        if not _within(real, root) or real == root:
            raise outside
        return "file://" + real
    rel = given[len(root):] if given_proto is not None and _within(given, root) else given
    if given_proto is not None and rel == given:
        raise outside
    norm = posixpath.normpath("/" + rel.lstrip("/"))
    if ".." in rel.split("/") or norm == "/":
        raise outside
    if proto in storage_roots.HTTP_PROTOCOLS:
        norm = quote(norm, safe="/")  # a path, never a query or fragment of the root's server
    return f"{proto}://{root.rstrip('/')}{norm}"


def _is_local(protocol: str | None) -> bool:
    return protocol in (None, "file", "local")


def _read_local(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # resolved already: no symlink swap
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IsADirectoryError(path)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


def _read_url(url: str, limit: int) -> bytes:
    if url.startswith("file://"):
        return _read_local(url.removeprefix("file://"), limit)
    with fsspec.open(url, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


async def storage_fetch(url: str, limit: int, net: netpolicy.NetPolicy | None = None) -> Fetched:
    """Read one stored object. http(s) roots go through the network policy like ``http_url``
    attachments (every address checked, connection pinned, every redirect checked); object stores
    (s3/gcs/az) use the endpoint and credentials of the operator's environment."""
    if storage_roots.has_chain(url):
        raise pipeline.PrepareError("storage refused: protocol chains (::) are not allowed")
    proto = url.split("://", 1)[0].lower() if "://" in url else "file"
    if proto in storage_roots.HTTP_PROTOCOLS:
        if net is None:
            raise pipeline.PrepareError("storage refused: no network policy for an http(s) root")
        return await http_fetch("GET", url, limit=limit, policy=net)
    if proto not in storage_roots.ALLOWED_PROTOCOLS:
        raise pipeline.PrepareError("storage refused: protocol not allowed")
    try:
        return Fetched(await asyncio.to_thread(_read_url, url, limit))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise pipeline.PrepareError("attachment not found in storage") from None
    except (ImportError, ValueError) as exc:  # unknown protocol, missing backend package
        raise pipeline.PrepareError(f"storage not usable: {exc}") from None
    except OSError as exc:
        raise pipeline.PrepareError(f"storage read failed: {type(exc).__name__}", temporary=True) from None


def _write_url(url: str, data: bytes) -> None:
    if url.startswith("file://"):
        path = url.removeprefix("file://")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == len(data):
            return  # content-addressed: a retry finds its earlier upload
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o640)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    if fs.exists(path) and fs.size(path) == len(data):
        return  # content-addressed: a retry finds its earlier upload
    with fs.open(path, "wb") as fh:
        fh.write(data)


# --- tenant configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LargeFilePolicy:
    enabled: bool = False
    max_bytes: int = 10 * MB
    action: str = "warn"  # warn | reject | rewrite
    storage_url: str | None = None  # admin-set raw root
    storage_root: str | None = None  # the name of an operator root
    public_base_url: str | None = None
    ttl_days: float = 30.0

    @staticmethod
    def of(tenant: dict[str, Any] | None) -> LargeFilePolicy:
        raw = (tenant or {}).get("large_file_config_json")
        try:
            cfg = json.loads(raw) if raw else {}
        except ValueError:
            cfg = {}
        if not isinstance(cfg, dict):
            cfg = {}
        action = str(cfg.get("action") or "warn").lower()
        try:
            max_mb = float(cfg.get("max_size_mb") if cfg.get("max_size_mb") is not None else 10.0)
            ttl = float(cfg.get("file_ttl_days") if cfg.get("file_ttl_days") is not None else 30)
        except (TypeError, ValueError):
            max_mb, ttl = 10.0, 30.0
        return LargeFilePolicy(
            enabled=bool(cfg.get("enabled")),
            max_bytes=max(1, int(max_mb * MB)),
            action=action if action in ("warn", "reject", "rewrite") else "warn",
            storage_url=cfg.get("storage_url") if isinstance(cfg.get("storage_url"), str) else None,
            storage_root=cfg.get("storage_root") if isinstance(cfg.get("storage_root"), str) else None,
            public_base_url=cfg.get("public_base_url") if isinstance(cfg.get("public_base_url"), str) else None,
            ttl_days=ttl if ttl > 0 else 30.0,
        )


def _auth_for(ctx: pipeline.SendContext, att: dict[str, Any]) -> tuple[dict[str, str], httpx.Auth | None]:
    """The attachment's own auth if it has one, else the tenant's client auth (as the reporter uses it)."""
    own = att.get("auth")
    tenant = ctx.tenant or {}
    if own is not None:
        method, user, secret_enc = own.get("method"), own.get("user"), own.get("secret_enc")
    else:
        method = tenant.get("client_auth_method")
        user, secret_enc = tenant.get("client_auth_user"), tenant.get("client_auth_secret_enc")
    method = (method or "none").lower()
    if method == "none":
        return {}, None
    try:
        secret = load_secret_box(get_settings()).decrypt(secret_enc) or ""
    except ValueError:
        raise pipeline.PrepareError("attachment auth cannot be decrypted") from None
    if method == "bearer":
        return {"Authorization": f"Bearer {secret}"}, None
    if method == "basic":
        return {}, httpx.BasicAuth(user or "", secret)
    return {}, None


# --- cache ---------------------------------------------------------------------------------------------

class ByteCache:
    """LRU by total bytes. Keys are per tenant: tenant + sha256 of the source descriptor and, when the
    attachment declares an MD5 (``content_md5`` or a ``{MD5:...}`` filename marker), also tenant + the
    MD5 of the fetched bytes themselves (so an MD5 hit always returns content with that MD5; such an
    entry is counted twice against the bound)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, Fetched] = OrderedDict()

    def get(self, key: str) -> Fetched | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: Fetched) -> None:
        if len(value.data) > self.max_bytes // 4:
            return  # one huge file must not flush everything else
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old.data)
        self._items[key] = value
        self.size += len(value.data)
        while self.size > self.max_bytes and self._items:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped.data)


_cache: ByteCache | None = None


def cache() -> ByteCache:
    global _cache
    if _cache is None:
        _cache = ByteCache(get_settings().attachments_cache_bytes)
    return _cache


def cache_key(tenant_id: str, descriptor: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(descriptor, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{tenant_id}\x1f{digest}"


def md5_cache_key(tenant_id: str, md5_hex: str) -> str:
    """Content-addressed key: the tenant and the MD5 (32 lower-case hex digits) of the bytes."""
    return f"{tenant_id}\x1fmd5:{md5_hex}"


# --- genro-mail-proxy 0.6 conventions: the {MD5:...} filename marker, MIME type from the name ---------

_MD5_MARKER = re.compile(r"\{MD5:([0-9A-Fa-f]+)\}")


def split_md5_marker(filename: str) -> tuple[str, str | None]:
    """``(name without the markers, the first marker's MD5 in lower-case hex or None)``. The marker
    and the underscores around it go: ``report_{MD5:ab..}.pdf`` -> ``report.pdf``, ``a_{MD5:..}_b.txt``
    -> ``a_b.txt``. A marker that is not 32 hex digits is stripped but is no cache key."""
    found = _MD5_MARKER.search(filename)
    if found is None:
        return filename, None
    md5 = found.group(1).lower()
    clean = filename
    while (m := _MD5_MARKER.search(clean)) is not None:
        before, after = clean[:m.start()].rstrip("_"), clean[m.end():].lstrip("_")
        clean = f"{before}_{after}" if before and after and not after.startswith(".") else before + after
    return clean or "attachment", md5 if len(md5) == 32 else None


def normalize_md5(value: str | None) -> str | None:
    """A ``content_md5`` (32 hex digits, or base64 of the 16-byte digest) as lower-case hex; None
    when it is neither."""
    if not value:
        return None
    v = value.strip()
    if len(v) == 32:
        try:
            bytes.fromhex(v)
            return v.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


_MIMES = mimetypes.MimeTypes()  # the built-in table only: the same answer on every host
_GENERIC_TYPES = {"application/octet-stream", "binary/octet-stream", "application/binary", "application/unknown",
                  "application/x-download", "application/force-download"}
_ENCODING_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


def guess_mime(filename: str) -> str | None:
    """The MIME type of a file name's extension (``report.pdf`` -> ``application/pdf``), or None."""
    guessed, encoding = _MIMES.guess_type(filename, strict=False)
    if encoding is not None:  # report.tar.gz is a gzip file, not a tar one
        return _ENCODING_TYPES.get(encoding)
    return guessed


def choose_mime(given: str | None, fetched: str | None, filename: str) -> str | None:
    """The attachment's MIME type: the client's ``mime_type``, else the fetch's Content-Type when it
    is specific, else the guess from the file name, else whatever the fetch said (None: the builder
    writes application/octet-stream). Only plain ``type/subtype`` tokens, never free text."""
    def ok(v: str | None) -> str | None:
        return v if v and _MIME_TYPE.match(v) else None

    if ok(given):
        return given
    fetched = ok(fetched)
    if fetched and fetched.lower() not in _GENERIC_TYPES:
        return fetched
    return ok(guess_mime(filename)) or fetched


# --- checks ------------------------------------------------------------------------------------------

def md5_matches(data: bytes, expected: str) -> bool:
    """``content_md5`` as 32 hex digits or base64 (Content-MD5 style)."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    value = expected.strip()
    if len(value) == 32:
        try:
            return bytes.fromhex(value) == digest
        except ValueError:
            pass
    try:
        return base64.b64decode(value, validate=True) == digest
    except (binascii.Error, ValueError):
        return False


# --- the fetch ------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """One attachment ready for the builder: its bytes, or (rewrite) the download link replacing it."""

    att: dict[str, Any]
    data: bytes | None
    link: str | None = None
    size: int = 0


async def _fetch_source(ctx: pipeline.SendContext, att: dict[str, Any], limit: int,
                        settings: Settings, policy: LargeFilePolicy) -> Fetched:
    mode = att["fetch_mode"]
    if mode == "base64":
        try:
            data = decode_base64_attachment(att)
        except ValueError as exc:
            raise pipeline.PrepareError(str(exc)) from exc
        if len(data) > limit:
            raise TooLarge(limit)
        return Fetched(data)
    net = netpolicy.NetPolicy.from_settings(settings)
    tenant_id = ctx.message["tenant_id"]
    if mode == "http_url":
        url = att["storage_path"]
        descriptor: dict[str, Any] = {"m": mode, "u": url, "a": _auth_descriptor(att)}
    elif mode == "endpoint":
        base = (ctx.tenant or {}).get("client_base_url")
        if not base:
            raise pipeline.PrepareError("endpoint attachment but the tenant has no client_base_url")
        url = base.rstrip("/") + ((ctx.tenant or {}).get("client_attachment_path") or DEFAULT_ATTACHMENT_PATH)
        descriptor = {"m": mode, "u": url, "p": att["storage_path"], "a": _auth_descriptor(att)}
    elif mode == "storage":
        root = tenant_root(tenant_id, policy, settings)
        if not root:
            raise pipeline.PrepareError("storage attachment but no storage root is configured")
        url = resolve_in_root(root, att["storage_path"])
        descriptor = {"m": mode, "u": url}
    else:
        raise pipeline.PrepareError(f"unknown attachment fetch_mode {mode!r}")

    # a declared MD5 (content_md5, else the filename marker) looks up content-addressed entries;
    # without one, the source descriptor is the key
    declared = normalize_md5(att.get("content_md5")) or split_md5_marker(att["filename"])[1]
    key = cache_key(tenant_id, descriptor)
    hit = (cache().get(md5_cache_key(tenant_id, declared)) if declared else None) or cache().get(key)
    if hit is not None:
        if len(hit.data) > limit:
            raise TooLarge(limit)
        return hit
    timeout = settings.attachments_fetch_timeout_s
    try:
        async with asyncio.timeout(timeout * 2):  # whole fetch, redirects included
            if mode == "storage":
                fetched = await storage_fetch(url, limit, net)
            else:
                headers, auth = _auth_for(ctx, att)
                if mode == "http_url":
                    fetched = await http_fetch("GET", url, limit=limit, policy=net,
                                               headers=headers, auth=auth)
                else:
                    fetched = await http_fetch("POST", url, limit=limit, policy=net, headers=headers,
                                               auth=auth, json_body={"storage_path": att["storage_path"]},
                                               follow=False)
    except TimeoutError:
        raise pipeline.PrepareError(f"attachment fetch timed out after {timeout * 2:g}s", temporary=True) from None
    cache().put(key, fetched)
    if declared:  # also under the MD5 of what was fetched (not the declared one): never serves other bytes
        cache().put(md5_cache_key(tenant_id, hashlib.md5(fetched.data, usedforsecurity=False).hexdigest()), fetched)
    return fetched


def _auth_descriptor(att: dict[str, Any]) -> Any:
    own = att.get("auth")
    return None if own is None else [own.get("method"), own.get("user")]  # never the secret


async def prepare_attachment(ctx: pipeline.SendContext, att: dict[str, Any]) -> Prepared:
    """Fetch, verify and apply the size policy to one attachment."""
    if ctx.tenant is None:
        # every queued message has a tenant: this process's view of it is behind, not gone
        raise pipeline.PrepareError("tenant configuration not loaded yet", temporary=True)
    settings = get_settings()
    policy = LargeFilePolicy.of(ctx.tenant)
    threshold = policy.max_bytes if policy.enabled else settings.attachments_max_bytes
    lenient = policy.enabled and policy.action in ("warn", "rewrite")
    limit = settings.attachments_hard_max_bytes if lenient else threshold
    name = att["filename"]  # as the client gave it (with any {MD5:...} marker): errors name it so
    try:
        fetched = await _fetch_source(ctx, att, limit, settings, policy)
    except TooLarge as exc:
        raise pipeline.PrepareError(f"attachment too large: {name!r} is over {exc.limit} bytes") from None
    except pipeline.PrepareError as exc:
        raise pipeline.PrepareError(f"Attachment fetch failed for {name}: {exc.reason}",
                                    temporary=exc.temporary) from None
    data = fetched.data
    if att.get("content_md5") and not md5_matches(data, att["content_md5"]):
        raise pipeline.PrepareError(f"attachment {name!r}: content_md5 mismatch")
    sent_name = split_md5_marker(name)[0]  # the recipient sees report.pdf, not report_{MD5:...}.pdf
    # the MIME type lands in a header: only a plain type/subtype token, never free text
    att = {**att, "filename": sent_name, "mime_type": choose_mime(att.get("mime_type"), fetched.content_type,
                                                                  sent_name)}
    if len(data) <= threshold:
        return Prepared(att, data, size=len(data))
    if policy.action == "warn":
        log.warning("large attachment sent as is", extra={"tenant_id": ctx.message["tenant_id"],
                                                          "id": ctx.message["id"], "bytes": len(data)})
        return Prepared(att, data, size=len(data))
    link = await _rewrite(ctx, att, data, policy, settings)
    return Prepared(att, None, link=link, size=len(data))


async def _rewrite(ctx: pipeline.SendContext, att: dict[str, Any], data: bytes, policy: LargeFilePolicy,
                   settings: Settings) -> str:
    """Upload to the tenant's storage (content-addressed) and return a signed download link."""
    tenant_id = ctx.message["tenant_id"]
    root = tenant_root(tenant_id, policy, settings)
    if not root:
        raise pipeline.PrepareError("large_file_config action rewrite needs a storage root")
    if root.split("://", 1)[0] in storage_roots.HTTP_PROTOCOLS:
        raise pipeline.PrepareError("large_file_config action rewrite: an http(s) storage root is read-only")
    digest = hashlib.sha256(data).hexdigest()
    safe_tenant = hashlib.sha256(tenant_id.encode()).hexdigest()[:16]  # tenant ids are not path-safe per se
    name = att["filename"] if att["filename"] not in (".", "..") else "attachment"
    url = resolve_in_root(root, f"{safe_tenant}/{digest}/{name}")
    try:
        await asyncio.to_thread(_write_url, url, data)
    except (ImportError, ValueError) as exc:
        raise pipeline.PrepareError(f"storage not usable: {exc}") from None
    except OSError as exc:
        raise pipeline.PrepareError(f"storage upload failed: {type(exc).__name__}", temporary=True) from None
    expires = int(time.time() + policy.ttl_days * 86400)
    token = signed_links.sign(signed_links.link_key(settings), signed_links.Link(
        tenant_id, url, att["filename"], att.get("mime_type"), expires))
    base = policy.public_base_url or settings.attachments_public_base_url or \
        f"http://{settings.api_host}:{settings.api_port}"
    log.info("large attachment replaced by a download link", extra={"tenant_id": tenant_id,
                                                                   "id": ctx.message["id"], "bytes": len(data)})
    return f"{base.rstrip('/')}/files/{token}"
