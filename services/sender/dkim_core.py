"""DKIM signing primitives (dkimpy), without the sender app: rsa-sha256, relaxed/relaxed."""

from __future__ import annotations

from typing import Any

import dkim

from services.sender.addresses import parse_one

# headers signed when present (dkimpy signs each one that occurs in the message)
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post",
                  b"in-reply-to", b"references")


def sign(data: bytes, domain: str, selector: str, private_key_pem: bytes) -> bytes:
    """``data`` with a ``DKIM-Signature`` header prepended (rsa-sha256, relaxed/relaxed)."""
    present = {line.split(b":", 1)[0].strip().lower() for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
               if b":" in line and not line[:1].isspace()}
    headers = [h for h in SIGNED_HEADERS if h in present] or [b"from"]
    sig = dkim.sign(data, selector.encode(), domain.encode(), private_key_pem,
                    canonicalize=(b"relaxed", b"relaxed"), include_headers=headers)
    return sig + data


def from_domain(msg: dict[str, Any]) -> str:
    local, at, domain = parse_one(msg.get("from_addr") or "")[1].rpartition("@")
    return domain.rstrip(".").lower() if at and local else ""


def verify(data: bytes, selector: str, domain: str, txt_value: str) -> bool:
    """Verify the DKIM signature of ``data`` against a known key record (no DNS lookup): the
    ``dnsfunc`` answers ``<selector>._domainkey.<domain>`` with ``txt_value`` only."""
    expected = f"{selector}._domainkey.{domain}."

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        name_s = name.decode() if isinstance(name, bytes) else name
        return txt_value.encode() if name_s.rstrip(".") + "." == expected else b""

    return bool(dkim.verify(data, dnsfunc=dnsfunc))
