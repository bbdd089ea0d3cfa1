"""Per-account SMTP options: the API's PEM validation of ``ca_bundle_pem``, the sender's pool size,
certificate verification flag and SSL context with the account's extra CAs, and Account v1 records
read as v2 with the new fields' defaults."""

from __future__ import annotations

import io
import json
import ssl

import pytest
from fastavro import parse_schema, schemaless_writer
from pydantic import ValidationError

from services.api.models import AccountIn
from services.api.pem import check_ca_bundle
from services.common.avro import MAGIC, SCHEMA_DIR, codec
from services.common.settings import get_settings
from services.sender.smtp_pool import make_target, pool_size, tls_context
from tests.support.smtp_server import make_self_signed_cert


@pytest.fixture(scope="module")
def cert_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    cert, _ = make_self_signed_cert(tmp_path_factory.mktemp("ca"), "smtp.test")
    return cert.read_text()


@pytest.fixture(scope="module")
def key_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    _, key = make_self_signed_cert(tmp_path_factory.mktemp("key"), "smtp.test")
    return key.read_text()


def _account(**kw: object) -> AccountIn:
    return AccountIn.model_validate({"id": "main", "host": "smtp.example.test", **kw})


def test_defaults() -> None:
    a = _account()
    assert (a.max_connections, a.tls_verify, a.ca_bundle_pem) == (None, True, None)


def test_valid_pem_bundles_are_kept_as_is(cert_pem: str) -> None:
    assert _account(ca_bundle_pem=cert_pem).ca_bundle_pem == cert_pem
    two = cert_pem + "\n" + cert_pem
    assert check_ca_bundle(two) == two


@pytest.mark.parametrize("bad", [
    "", "hello", "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n",
])
def test_invalid_pem_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        _account(ca_bundle_pem=bad)


def test_non_ascii_or_nul_is_a_validation_error_not_a_crash(cert_pem: str) -> None:
    for bad in (cert_pem + "ü", cert_pem + "\x00", "-----BEGIN CERTIFICATE-----\nü\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValidationError):
            _account(ca_bundle_pem=bad)


def test_a_private_key_is_never_accepted(cert_pem: str, key_pem: str) -> None:
    for text in (key_pem, cert_pem + key_pem):
        with pytest.raises(ValidationError, match="private key"):
            _account(ca_bundle_pem=text)


@pytest.mark.parametrize("n", [0, 101, -1])
def test_max_connections_range(n: int) -> None:
    with pytest.raises(ValidationError):
        _account(max_connections=n)
    assert _account(max_connections=1).max_connections == 1
    assert _account(max_connections=100).max_connections == 100


def test_pool_size() -> None:
    default = get_settings().sender_connections_per_account
    assert pool_size(None) == default
    assert pool_size({"max_connections": None}) == default
    assert pool_size({}) == default  # an Account v1 record
    assert pool_size({"max_connections": 3}) == 3


def test_target_verification_and_extra_ca(cert_pem: str) -> None:
    t = make_target("t/a", "h", 25, None, None, None)
    assert t.validate_certs and t.ca_pem is None
    t = make_target("t/a", "h", 25, None, None, None, tls_verify=False)
    assert not t.validate_certs
    t = make_target("t/a", "h", 25, "u", "secret", None, True, cert_pem)
    assert t.validate_certs and t.ca_pem == cert_pem and "secret" not in repr(t)
    ctx = tls_context(True, None, cert_pem)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    subjects = [c["subject"] for c in ctx.get_ca_certs()]
    assert any(("commonName", "smtp.test") in rdn for s in subjects for rdn in s)
    off = tls_context(False, None, cert_pem)
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname


def test_account_v1_records_read_as_v2() -> None:
    v1 = parse_schema(json.loads((SCHEMA_DIR / "Account.v1.avsc").read_text()), named_schemas={})
    record = {"id": "main", "tenant_id": "t", "host": "h", "port": 25, "user": None, "password_enc": None,
              "use_tls": None, "batch_size": None, "limit_per_minute": None, "limit_per_hour": None,
              "limit_per_day": None, "limit_behavior": "defer", "created_ts": 1, "updated_ts": 2}
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(next(v.fingerprint for v in codec().schemas["Account"] if v.version == 1))
    schemaless_writer(buf, v1, record)
    name, decoded = codec().decode(buf.getvalue(), expect="Account")
    assert name == "Account"
    assert (decoded["max_connections"], decoded["tls_verify"], decoded["ca_bundle_pem"]) == (None, True, None)


def test_v2_round_trip(cert_pem: str) -> None:
    record = {"id": "main", "tenant_id": "t", "host": "h", "port": 25, "limit_behavior": "defer",
              "max_connections": 2, "tls_verify": False, "ca_bundle_pem": cert_pem, "created_ts": 1, "updated_ts": 2}
    _, decoded = codec().decode(codec().encode("Account", record), expect="Account")
    assert (decoded["max_connections"], decoded["tls_verify"], decoded["ca_bundle_pem"]) == (2, False, cert_pem)
