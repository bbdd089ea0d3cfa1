"""Salted digests of the records of a config view (a projection of a compacted topic), so that two
processes can show they hold the same view without either showing a record: the API answers
``GET /admin/views/digest`` with them, and ``postbus replay views`` computes the same digests from
the view it rebuilt from the topic (docs/cli.md).

A digest is SHA-256 over the caller's salt and the record's canonical JSON (sorted keys, bytes as
base64), truncated to 128 bits. The salt is random per call: a digest says "same record" or "not
the same" for that comparison only, and cannot be matched against guesses of a field's value
without it (the records hold encrypted secrets and password hashes)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

MIN_SALT_HEX = 32  # 16 random bytes at least
MAX_SALT_HEX = 128


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    return repr(value)


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default).encode()


def record_digest(salt: bytes, record: dict[str, Any]) -> str:
    return hashlib.sha256(salt + b"\0" + canonical(record)).hexdigest()[:32]


def view_digests(salt: bytes, items: dict[str, dict[str, Any]]) -> dict[str, str]:
    """key -> digest of its record, for every key of a view."""
    return {key: record_digest(salt, value) for key, value in sorted(items.items())}


def parse_salt(salt_hex: str) -> bytes:
    """The salt as bytes; ValueError unless MIN_SALT_HEX..MAX_SALT_HEX hex digits."""
    if not MIN_SALT_HEX <= len(salt_hex) <= MAX_SALT_HEX:
        raise ValueError(f"salt must be {MIN_SALT_HEX} to {MAX_SALT_HEX} hex digits")
    return bytes.fromhex(salt_hex)
