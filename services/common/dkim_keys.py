"""Native domain verification material: a verification token and an RSA-2048 DKIM key pair.

The private key leaves this module only as PEM for the caller to encrypt (SecretBox) before it
goes on a topic; the public key is published as ``v=DKIM1; k=rsa; p=<base64 DER>``."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class DkimKey:
    selector: str
    public_key_b64: str  # DER SubjectPublicKeyInfo, base64
    private_key_pem: str  # PKCS#8, unencrypted: encrypt before storing

    @property
    def txt_value(self) -> str:
        return dkim_txt_value(self.public_key_b64)


def dkim_txt_value(public_key_b64: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_key_b64}"


def new_selector(now: float | None = None) -> str:
    """``pb<yyyymm><random>``: dated, so rotated selectors are told apart, and unguessable."""
    return "pb" + time.strftime("%Y%m", time.gmtime(now)) + secrets.token_hex(3)


def generate_dkim_key(selector: str | None = None) -> DkimKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return DkimKey(selector or new_selector(), base64.b64encode(der).decode(), pem)


def verification_token() -> str:
    return secrets.token_urlsafe(32)


def dkim_tags(txt: str) -> dict[str, str]:
    """Tag list of a DKIM TXT record (RFC 6376 3.6.1), whitespace inside values removed."""
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags
