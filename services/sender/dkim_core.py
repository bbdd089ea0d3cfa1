"""DKIM signing primitives (dkimpy), without the sender app: rsa-sha256, relaxed/relaxed.

dkimpy does the canonicalisation and builds the header; the RSA operation is OpenSSL's (through
``cryptography``), with each private key parsed once: dkimpy parses the PEM and signs in pure Python
on every call (measured 25 ms per signature on a loaded 2-core machine, the limit of every
campaign, whose mail is always signed). PKCS#1 v1.5 signatures are deterministic, so the bytes are
the same as dkimpy's own (tests/unit/test_dkim_sign.py compares them)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from services.sender.addresses import parse_one

# headers signed when present (dkimpy signs each one that occurs in the message)
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
                  b"content-type", b"content-transfer-encoding", b"list-unsubscribe", b"list-unsubscribe-post",
                  b"in-reply-to", b"references")


class _OpenSslKey(dict):  # type: ignore[type-arg]
    """dkimpy's parsed-key dict (it reads ``pk["modulus"]``) carrying the OpenSSL key as well."""

    key: rsa.RSAPrivateKey


_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_pure_parse = dkim.parse_pem_private_key
_pure_sign = dkim.RSASSA_PKCS1_v1_5_sign


@lru_cache(maxsize=1024)
def _parse(pem: bytes) -> Any:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return _pure_parse(pem)  # dkimpy's own error for what OpenSSL cannot read either
    if not isinstance(key, rsa.RSAPrivateKey):
        return _pure_parse(pem)
    numbers = key.private_numbers()
    out = _OpenSslKey(modulus=numbers.public_numbers.n, publicExponent=numbers.public_numbers.e)
    out.key = key
    return out


def _sign_digest(h: Any, pk: Any) -> bytes:
    algorithm = _HASHES.get(str(getattr(h, "name", "")).lower())
    if isinstance(pk, _OpenSslKey) and algorithm is not None:
        return pk.key.sign(h.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    return _pure_sign(h, pk)


# dkimpy looks both names up in its module at call time
dkim.parse_pem_private_key = _parse
dkim.RSASSA_PKCS1_v1_5_sign = _sign_digest


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
