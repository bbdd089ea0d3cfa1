"""Secret redaction for anything shown to an operator: the API's command-log export
(``services/api/command_log.py``) and the CLI's tail, trace, dead letters and state-at. One rule: a
field whose name contains one of ``SECRET_MARKERS`` (also spelled with hyphens, as header names are)
is a secret, or derived from one, and is shown as ``"***"`` (null stays null: it reveals only that no
secret is set); bytes become base64 text."""

from __future__ import annotations

import base64
from typing import Any

REDACTED = "***"
SECRET_MARKERS = ("password", "secret", "token", "key_hash", "_enc", "authorization", "api_key")


def is_secret(name: str) -> bool:
    """A marker in the name, also with hyphens (a header map's ``X-API-Key``) or run together
    (``apikey``)."""
    low = name.lower()
    spelled = low.replace("-", "_")
    return any(m in low or m in spelled for m in SECRET_MARKERS) or "apikey" in low


def redact(value: Any) -> Any:
    """A JSON-able copy of ``value`` with every secret-named field replaced by ``"***"``."""
    if isinstance(value, dict):
        return {k: (REDACTED if value[k] is not None else None) if is_secret(str(k)) else redact(value[k])
                for k in value}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    return value
