"""Native verification material and the DNS check helpers."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_private_key

from services.common.dkim_keys import dkim_tags, generate_dkim_key, new_selector, verification_token
from services.common.dns_check import parse_resolvers


def test_dkim_key_pair_is_rsa_2048_and_published_as_dkim1() -> None:
    key = generate_dkim_key()
    public = load_der_public_key(base64.b64decode(key.public_key_b64))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    private = load_pem_private_key(key.private_key_pem.encode(), password=None)
    assert private.public_key().public_numbers() == public.public_numbers()
    tags = dkim_tags(key.txt_value)
    assert tags == {"v": "DKIM1", "k": "rsa", "p": key.public_key_b64}
    assert key.selector.startswith("pb") and key.selector != new_selector()


def test_dkim_tags_ignore_whitespace_in_values() -> None:
    assert dkim_tags("v=DKIM1;  k=rsa; p=AB CD\tEF ;")["p"] == "ABCDEF"


def test_verification_tokens_are_unique() -> None:
    assert len({verification_token() for _ in range(100)}) == 100


def test_parse_resolvers() -> None:
    assert parse_resolvers("") == []
    assert parse_resolvers("127.0.0.1:5353, 9.9.9.9,[::1]:5300") == [("127.0.0.1", 5353), ("9.9.9.9", 53),
                                                                      ("::1", 5300)]
    assert parse_resolvers("::1") == [("::1", 53)]
