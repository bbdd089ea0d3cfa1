"""Signed tokens of the tracking pixel, the click redirect and the unsubscribe link.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256(key, payload)[:16])``. The payload
names the kind (``o`` open, ``c`` click, ``u`` unsubscribe), tenant, message id, recipient, the
target URL for clicks and an expiry (unix seconds). The key is derived from the instance's secret
key material (POSTBUS_SECRET_KEY), so the sender mints and the API verifies without sharing more.
A forged, altered or expired token verifies to ``None``: the API then answers 404 and never
redirects anywhere (no open redirect: the only redirect target is the URL inside a valid token)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.common.settings import Settings

KINDS = {"o": "open", "c": "click", "u": "unsubscribe"}
MAX_TOKEN_LEN = 4096


@dataclass(frozen=True)
class Token:
    kind: str  # "o" | "c" | "u"
    tenant_id: str
    message_id: str
    recipient: str | None
    account_id: str | None
    url: str | None
    expires: int


def key_from_settings(settings: Settings) -> bytes:
    """The tracking HMAC key: a derivation of the secret key material (never the key itself)."""
    material = settings.secret_key
    if not material:
        path = Path(settings.state_dir) / "secret.key"
        material = path.read_text() if path.exists() else ""
    if not material.strip():
        raise RuntimeError("no secret key material for tracking tokens (POSTBUS_SECRET_KEY)")
    return hmac.new(material.strip().encode(), b"postbus tracking tokens v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def safe_url(url: str | None) -> bool:
    """Only absolute http(s) URLs with a host may be a click target."""
    if not url or len(url) > 2048 or any(c in url for c in "\r\n\x00"):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def mint(key: bytes, kind: str, tenant_id: str, message_id: str, recipient: str | None, *,
         account_id: str | None = None, url: str | None = None, ttl_s: int, now: float | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    if kind == "c" and not safe_url(url):
        raise ValueError("click tokens need an absolute http(s) URL")
    payload = {"k": kind, "t": tenant_id, "m": message_id, "r": recipient, "a": account_id,
               "e": int((now if now is not None else time.time()) + ttl_s)}
    if url is not None:
        payload["u"] = url
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return f"{_b64(raw)}.{_b64(hmac.new(key, raw, hashlib.sha256).digest()[:16])}"


def verify(key: bytes, token: str, kind: str, now: float | None = None) -> Token | None:
    """The token's content if it is genuine, of the expected kind and not expired; else None."""
    if not token or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        return None
    body, sig = token.split(".")
    try:
        raw, mac = _unb64(body), _unb64(sig)
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(mac, hmac.new(key, raw, hashlib.sha256).digest()[:16]):
        return None
    try:
        data = json.loads(raw)
        tok = Token(kind=data["k"], tenant_id=data["t"], message_id=data["m"], recipient=data.get("r"),
                    account_id=data.get("a"), url=data.get("u"), expires=int(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    if tok.kind != kind or tok.expires < (now if now is not None else time.time()):
        return None
    if kind == "c" and not safe_url(tok.url):
        return None
    return tok
