"""SES backend: status mapping, DNS records, error mapping (no provider text leaks), and the real
calls against moto's server on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import boto3
import pytest
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from services.common import ses_backend as ses

DOMAIN = "example.test"
SECRET = "unit-secret-key-never-shown"


@pytest.fixture(autouse=True)
def _fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stubbed() -> tuple[ses.SesBackend, Stubber]:
    backend = ses.SesBackend("us-east-1", None, 2.0)
    backend._client = boto3.client("ses", region_name="us-east-1")
    return backend, Stubber(backend._client)


def test_map_status() -> None:
    for s in ("Pending", "Success", "Failed", "TemporaryFailure", "NotStarted"):
        assert ses.map_status(s) == s
    assert ses.map_status(None) == "NotStarted"
    assert ses.map_status("SomethingNew") == "TemporaryFailure"


def test_dns_records_shape() -> None:
    v = ses.SesVerification("tok+en=", ["aaa1", "bbb2", "ccc3"])
    assert ses.dns_records(DOMAIN, v) == [
        {"type": "TXT", "name": "_amazonses.example.test", "value": "tok+en="},
        {"type": "CNAME", "name": "aaa1._domainkey.example.test", "value": "aaa1.dkim.amazonses.com"},
        {"type": "CNAME", "name": "bbb2._domainkey.example.test", "value": "bbb2.dkim.amazonses.com"},
        {"type": "CNAME", "name": "ccc3._domainkey.example.test", "value": "ccc3.dkim.amazonses.com"},
    ]


@pytest.mark.parametrize(("ident", "dkim"), [("Pending", "Pending"), ("Failed", "Success"),
                                             ("TemporaryFailure", "Failed"), ("Success", "Success")])
async def test_status_maps_each_ses_status(ident: str, dkim: str) -> None:
    backend, stub = stubbed()
    stub.add_response("get_identity_verification_attributes",
                      {"VerificationAttributes": {DOMAIN: {"VerificationStatus": ident, "VerificationToken": "t"}}},
                      {"Identities": [DOMAIN]})
    stub.add_response("get_identity_dkim_attributes",
                      {"DkimAttributes": {DOMAIN: {"DkimEnabled": True, "DkimVerificationStatus": dkim}}},
                      {"Identities": [DOMAIN]})
    with stub:
        assert await backend.status(DOMAIN) == ses.SesStatus(ident, dkim)
    stub.assert_no_pending_responses()


async def test_status_of_an_unknown_identity_is_not_started() -> None:
    backend, stub = stubbed()
    stub.add_response("get_identity_verification_attributes", {"VerificationAttributes": {}})
    stub.add_response("get_identity_dkim_attributes", {"DkimAttributes": {}})
    with stub:
        assert await backend.status(DOMAIN) == ses.SesStatus("NotStarted", "NotStarted")


@pytest.mark.parametrize(("code", "status"), [("Throttling", 503), ("ServiceUnavailable", 503),
                                              ("InvalidParameterValue", 502), ("AccessDenied", 502)])
async def test_ses_errors_become_safe_unavailable(code: str, status: int) -> None:
    backend, stub = stubbed()
    stub.add_client_error("verify_domain_identity", service_error_code=code,
                          service_message="internal arn:aws:ses:us-east-1:123456789012 detail", http_status_code=400)
    with stub, pytest.raises(ses.SesUnavailable) as info:
        await backend.verify(DOMAIN)
    assert info.value.status == status
    assert "arn:" not in str(info.value) and "123456789012" not in str(info.value)


async def test_unusable_tokens_are_refused() -> None:
    backend, stub = stubbed()
    stub.add_response("verify_domain_identity", {"VerificationToken": "ok-token"})
    stub.add_response("verify_domain_dkim", {"DkimTokens": ["good", "bad.name"]})
    with stub, pytest.raises(ses.SesUnavailable) as info:
        await backend.verify(DOMAIN)
    assert info.value.status == 502


async def test_unreachable_endpoint_is_503() -> None:
    backend = ses.SesBackend(None, f"http://127.0.0.1:{_free_port()}", 1.0)  # nothing listens there
    with pytest.raises(ses.SesUnavailable) as info:
        await backend.status(DOMAIN)
    assert info.value.status == 503
    assert "127.0.0.1" not in str(info.value) and SECRET not in str(info.value)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


async def test_verify_and_status_against_moto(moto_url: str) -> None:
    backend = ses.SesBackend("us-east-1", moto_url, 5.0)
    assert await backend.status("fresh.example.test") == ses.SesStatus("NotStarted", "NotStarted")
    v = await backend.verify("fresh.example.test")
    assert v.verification_token and len(v.dkim_tokens) == 3
    # the identity now exists in SES (moto verifies identities at once)
    ids = boto3.client("ses", region_name="us-east-1", endpoint_url=moto_url).list_identities()["Identities"]
    assert "fresh.example.test" in ids
    assert await backend.status("fresh.example.test") == ses.SesStatus("Success", "Success")
