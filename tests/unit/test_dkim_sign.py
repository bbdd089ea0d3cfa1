"""DKIM signature of the sender (dkimpy), verified with dkimpy against the public key record."""

from __future__ import annotations

from services.common.dkim_keys import generate_dkim_key
from services.sender.dkim_core import from_domain, sign, verify
from services.sender.mime import build_message


def _message() -> bytes:
    msg = {"id": "m1", "tenant_id": "t1", "account_id": "a1", "pk": "pk1", "from_addr": "Shop <news@Shop.Example>",
           "to": ["bob@example.org"], "cc": [], "bcc": [], "reply_to": None, "return_path": None,
           "subject": "Ciao à tutti", "body_text": "Hello\nworld  with   spaces \n", "body_html": None, "headers": {},
           "attachments": [], "priority": 2, "accepted_ts": 0, "deferred_ts": None, "batch_code": None}
    return build_message(msg, [])


def test_signature_verifies_with_the_published_key() -> None:
    key = generate_dkim_key()
    data = _message()
    signed = sign(data, "shop.example", key.selector, key.private_key_pem.encode())
    assert signed.startswith(b"DKIM-Signature:")
    assert signed.endswith(data)
    header = signed[: signed.index(data)].decode()
    tags = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in "".join(header.split()).split(";"))}
    assert tags["c"] == "relaxed/relaxed" and tags["a"] == "rsa-sha256"
    assert tags["d"] == "shop.example" and tags["s"] == key.selector
    assert "from" in tags["h"].lower().split(":") and "subject" in tags["h"].lower().split(":")
    assert verify(signed, key.selector, "shop.example", key.txt_value)


def test_relaxed_canonicalisation_survives_whitespace_changes_but_not_content_changes() -> None:
    key = generate_dkim_key()
    signed = sign(_message(), "shop.example", key.selector, key.private_key_pem.encode())
    head, _, body = signed.partition(b"\r\n\r\n")
    # relaxed/relaxed: trailing whitespace and runs of spaces in the body do not matter
    relaxed = head + b"\r\n\r\n" + body.replace(b" ", b"  ").replace(b"\r\n", b"  \r\n")
    assert verify(relaxed, key.selector, "shop.example", key.txt_value)
    tampered = head + b"\r\n\r\n" + body.replace(b"Hello", b"Jello")
    assert tampered != signed
    assert not verify(tampered, key.selector, "shop.example", key.txt_value)
    # another key (e.g. a retired selector's) does not verify
    other = generate_dkim_key(key.selector)
    assert not verify(signed, key.selector, "shop.example", other.txt_value)


def test_from_domain() -> None:
    assert from_domain({"from_addr": "Shop <news@Shop.Example>"}) == "shop.example"
    assert from_domain({"from_addr": "nobody"}) == ""


def test_openssl_signature_is_byte_identical_to_dkimpys_pure_python_one() -> None:
    """PKCS#1 v1.5 is deterministic: OpenSSL's signature of a digest must equal dkimpy's own."""
    import hashlib
    import time

    from services.sender import dkim_core

    pem = generate_dkim_key().private_key_pem.encode()
    fast_key, pure_key = dkim_core._parse(pem), dkim_core._pure_parse(pem)
    assert isinstance(fast_key, dkim_core._OpenSslKey) and fast_key["modulus"] == pure_key["modulus"]
    for text in (b"", b"a header block", bytes(range(256)) * 40):
        assert dkim_core._sign_digest(hashlib.sha256(text), fast_key) == \
            dkim_core._pure_sign(hashlib.sha256(text), pure_key)
    # and it is the cheap one (the reason for it): a lenient bound, the loaded machine's numbers vary
    t0 = time.perf_counter()
    for _ in range(20):
        dkim_core._pure_sign(hashlib.sha256(b"x"), dkim_core._pure_parse(pem))
    pure = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        dkim_core._sign_digest(hashlib.sha256(b"x"), dkim_core._parse(pem))
    assert time.perf_counter() - t0 < pure / 2
