"""VERP return paths: ``bounce+<tenant>=<id>@<verp domain>``, so a bounce that quotes nothing of the
original still names its message by the address it is sent to.

Encoding of the tenant and the message id: ``a-z``, ``0-9`` and ``-`` stay as they are, every other
byte of their UTF-8 (upper case, ``.``, ``_``, ``@``, ``=``, ``+``, ...) becomes ``_`` + two lower-case
hex digits. The result has no ``=`` or ``+`` (the separators), no dot (dot-atom rules) and survives a
relay that changes the case of the local part (decoding lower-cases first)."""

from __future__ import annotations

import re

PREFIX = "bounce+"
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPED = re.compile(r"^(?:[a-z0-9-]|_[0-9a-f]{2})*$")


def encode_part(value: str) -> str:
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if ch in _PLAIN else f"_{byte:02x}")
    return "".join(out)


def decode_part(text: str) -> str | None:
    text = text.lower()
    if not text or not _ESCAPED.match(text):
        return None
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "_":
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(text[i]))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode(tenant_id: str, message_id: str, domain: str) -> str:
    return f"{PREFIX}{encode_part(tenant_id)}={encode_part(message_id)}@{domain}"


def decode(address: str, domain: str) -> tuple[str, str] | None:
    """(tenant id, message id) of a VERP address at ``domain``; None for any other address."""
    local, at, addr_domain = address.strip().strip("<>").rpartition("@")
    if not at or addr_domain.lower() != domain.lower().strip() or not local.lower().startswith(PREFIX):
        return None
    tenant, sep, mid = local[len(PREFIX):].partition("=")
    if not sep:
        return None
    t, m = decode_part(tenant), decode_part(mid)
    return (t, m) if t and m else None
