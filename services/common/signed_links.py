"""Signed, expiring download links for attachments that large_file_config moved to storage.

A token is ``base64url(JSON claims) "." base64url(HMAC-SHA256(claims))``. The claims name the
tenant, the full fsspec URL of the stored file, its filename and MIME type, and the expiry. The key
is derived from the POSTBUS_SECRET_KEY material (never the key itself), so only Postbus can mint a
link and the API serves exactly the object a link names: there is no path for a caller to choose."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.crypto import load_secret_box
from services.common.settings import Settings

_CONTEXT = b"postbus/signed-links/v1"
MAX_TOKEN_LEN = 4096


class InvalidLink(ValueError):
    """Forged, truncated or malformed token."""


class ExpiredLink(ValueError):
    """A genuine token past its expiry."""


@dataclass(frozen=True)
class Link:
    tenant_id: str
    url: str  # fsspec URL of the stored object
    filename: str
    mime_type: str | None
    expires_ts: int  # unix seconds


def link_key(settings: Settings) -> bytes:
    """HMAC key derived from the secret key material (dev mode: the generated key in the state dir)."""
    load_secret_box(settings)  # makes sure the dev key exists (or fails like every other service)
    material = settings.secret_key or (Path(settings.state_dir) / "secret.key").read_text()
    return hmac.new(material.strip().encode(), _CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, link: Link) -> str:
    claims = {"t": link.tenant_id, "u": link.url, "f": link.filename, "m": link.mime_type, "e": link.expires_ts}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return body + "." + _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())


def verify(key: bytes, token: str, now: float | None = None) -> Link:
    """The link a token names; :class:`InvalidLink` when it is not ours, :class:`ExpiredLink` when late."""
    if not token or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        raise InvalidLink("malformed token")
    body, sig = token.split(".")
    try:
        given = _unb64(sig)
    except (binascii.Error, ValueError):
        raise InvalidLink("malformed signature") from None
    expected = hmac.new(key, body.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected):
        raise InvalidLink("bad signature")
    try:
        claims: Any = json.loads(_unb64(body))
        link = Link(str(claims["t"]), str(claims["u"]), str(claims["f"]), claims.get("m"), int(claims["e"]))
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidLink("malformed claims") from None
    if link.expires_ts < (time.time() if now is None else now):
        raise ExpiredLink("link expired")
    return link
