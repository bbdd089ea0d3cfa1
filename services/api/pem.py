"""Validation of an account's ``ca_bundle_pem``: PEM certificates only (it is stored on the config
topic as-is, so a private key pasted by mistake must never be accepted), each one loadable both by
``cryptography`` and by the ``ssl`` module the sender builds its context with."""

from __future__ import annotations

import re
import ssl
from typing import Annotated

from cryptography import x509
from pydantic import AfterValidator

MAX_PEM_CHARS = 262_144  # a full public CA bundle is ~220 KB
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


def check_ca_bundle(text: str) -> str:
    """The PEM text unchanged, or ValueError saying what is wrong with it."""
    if not text.isascii() or "\x00" in text:
        raise ValueError("ca_bundle_pem must be ASCII PEM text")
    kinds = set(_BLOCK.findall(text))
    if any("PRIVATE KEY" in k for k in kinds):
        raise ValueError("ca_bundle_pem must not contain a private key")
    if kinds != {"CERTIFICATE"}:
        raise ValueError("ca_bundle_pem must hold PEM certificates (-----BEGIN CERTIFICATE-----) and nothing else")
    try:
        certs = x509.load_pem_x509_certificates(text.encode("utf-8"))
        ssl.create_default_context().load_verify_locations(cadata=text)
    except (ValueError, TypeError, ssl.SSLError, UnicodeError) as exc:
        raise ValueError(f"ca_bundle_pem is not valid PEM certificate data: {type(exc).__name__}") from None
    if not certs:
        raise ValueError("ca_bundle_pem holds no certificate")
    return text


CaBundlePem = Annotated[str, AfterValidator(check_ca_bundle)]
