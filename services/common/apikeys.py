"""Tenant API keys: ``pbk_<key_id>_<secret>``. Only an HMAC of the secret is stored; the key id
makes lookup O(1) and the comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def _hash(secret: str, pepper: bytes) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def pepper_from(secret_key: str | bytes) -> bytes:
    raw = secret_key.encode() if isinstance(secret_key, str) else secret_key
    return hashlib.sha256(b"postbus-apikey-pepper:" + raw).digest()


def new_api_key(pepper: bytes) -> tuple[str, str, str]:
    """Returns (full key to show once, key id, hash to store)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"pbk_{key_id}_{secret}", key_id, _hash(secret, pepper)


def parse_api_key(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "pbk" or len(parts[1]) != 16:
        return None
    return parts[1], parts[2]


def verify(secret: str, stored_hash: str, pepper: bytes) -> bool:
    return hmac.compare_digest(_hash(secret, pepper), stored_hash)
