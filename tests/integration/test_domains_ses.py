"""Outbound domain verification through the optional Amazon SES backend, against moto's server.

The module runs its own system with ``POSTBUS_DOMAIN_BACKEND=ses`` pointed at a moto server on
loopback (fake AWS credentials through boto3's standard environment). moto verifies identities at
once, so the status goes NotStarted -> (ses-verify) -> Success and the domain is marked verified
through the command path. The last test stops moto: SES unreachable answers 503 ses_unavailable."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from infra.supervisor import LocalSystem, free_port
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.integration
ADMIN = "ses-admin-" + uuid.uuid4().hex
AWS_SECRET = "ses-test-secret-" + uuid.uuid4().hex  # must never show up in answers or logs
VERIFY_FIELDS = {"name", "ses_verification_token", "ses_dkim_tokens", "ses_verified", "dns_records"}


@dataclass
class SesSystem:
    system: LocalSystem
    moto: ThreadedMotoServer
    moto_url: str
    admin: httpx.Client

    def ses(self) -> Any:
        return boto3.client("ses", region_name="us-east-1", endpoint_url=self.moto_url,
                            aws_access_key_id="testing", aws_secret_access_key=AWS_SECRET)

    def tenant(self) -> httpx.Client:
        tid = "ses" + uuid.uuid4().hex[:10]
        r = self.admin.post("/tenant", json={"id": tid, "name": tid})
        assert r.status_code == 200, r.text
        return httpx.Client(base_url=self.system.url("api"), headers={"X-API-Token": r.json()["api_key"]},
                            timeout=60)


@pytest.fixture(scope="module")
def ses_sys() -> Iterator[SesSystem]:
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    moto_url = f"http://127.0.0.1:{port}"
    state = REPO / ".test-state" / f"ses-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    sys_ = LocalSystem.with_free_ports(state, admin_token=ADMIN, kafka_heap="256m", env={
        "POSTBUS_DOMAIN_BACKEND": "ses", "POSTBUS_SES_ENDPOINT_URL": moto_url, "POSTBUS_SES_TIMEOUT_S": "3",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        "POSTBUS_SENDER_MX_LOOKUP": "0"})
    try:
        sys_.start()
        with httpx.Client(base_url=sys_.url("api"), headers={"X-API-Token": ADMIN}, timeout=60) as admin:
            yield SesSystem(sys_, moto, moto_url, admin)
    finally:
        sys_.stop()
        moto.stop()
        if os.environ.get("POSTBUS_KEEP_TEST_STATE") != "1":
            shutil.rmtree(state, ignore_errors=True)


def domain() -> str:
    return f"s{uuid.uuid4().hex[:10]}.example.test"


def test_ses_verify_then_status_marks_the_domain_verified(ses_sys: SesSystem) -> None:
    with ses_sys.tenant() as t:
        name = domain()
        assert t.put(f"/domains/{name}/outbound", json={}).status_code == 200
        before = t.get(f"/domains/{name}/ses-status")
        assert before.status_code == 200, before.text
        assert before.json() == {"name": name, "ses_verified": False, "verification_status": "NotStarted",
                                 "dkim_status": "NotStarted"}
        assert name not in ses_sys.ses().list_identities()["Identities"]  # no SES call before ses-verify

        r = t.post(f"/domains/{name}/ses-verify")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == VERIFY_FIELDS
        assert body["name"] == name and body["ses_verified"] is False
        # the tokens are SES's own: the identity now exists in SES with that DKIM token set
        assert name in ses_sys.ses().list_identities()["Identities"]
        tokens = body["ses_dkim_tokens"]
        assert len(tokens) == 3
        assert ses_sys.ses().get_identity_dkim_attributes(Identities=[name])["DkimAttributes"][name][
            "DkimTokens"] == tokens
        assert body["dns_records"] == [
            {"type": "TXT", "name": f"_amazonses.{name}", "value": body["ses_verification_token"]},
            *({"type": "CNAME", "name": f"{tok}._domainkey.{name}", "value": f"{tok}.dkim.amazonses.com"}
              for tok in tokens)]
        assert t.get(f"/domains/{name}/outbound").json()["ses_verified"] is False

        after = t.get(f"/domains/{name}/ses-status")
        assert after.status_code == 200, after.text
        assert after.json() == {"name": name, "ses_verified": True, "verification_status": "Success",
                                "dkim_status": "Success"}
        # written through the command path: readable at once, and by the admin too
        assert t.get(f"/domains/{name}/outbound").json()["ses_verified"] is True
        assert ses_sys.admin.get(f"/domains/{name}/outbound").json()["ses_verified"] is True
        again = t.post(f"/domains/{name}/ses-verify")  # repeatable: same SES material, stays verified
        assert again.status_code == 200 and again.json()["ses_dkim_tokens"] == tokens
        assert again.json()["ses_verified"] is True


def test_ses_verify_registers_a_new_domain_and_keeps_tenants_apart(ses_sys: SesSystem) -> None:
    with ses_sys.tenant() as owner, ses_sys.tenant() as other:
        name = domain()
        r = owner.post(f"/domains/{name}/ses-verify")  # a tenant key registers an unknown domain
        assert r.status_code == 200, r.text
        out = owner.get(f"/domains/{name}/outbound")
        assert out.status_code == 200 and out.json()["ses_verified"] is False
        # the owner's claim is unverified and live: SES identities are the platform's, so another
        # tenant cannot prove anything through SES; it waits for the claim to expire
        for call in (lambda: other.post(f"/domains/{name}/ses-verify"),
                     lambda: other.get(f"/domains/{name}/ses-status"),
                     lambda: other.put(f"/domains/{name}/outbound", json={})):
            resp = call()
            assert resp.status_code == 409 and resp.json()["error"]["code"] == "domain_claim_pending", resp.text
        unknown = domain()
        assert ses_sys.admin.post(f"/domains/{unknown}/ses-verify").status_code == 404
        assert unknown not in ses_sys.ses().list_identities()["Identities"]
        assert owner.get(f"/domains/{name}/ses-status").json()["ses_verified"] is True
        # verified: the owner's for good
        for call in (lambda: other.post(f"/domains/{name}/ses-verify"),
                     lambda: other.get(f"/domains/{name}/ses-status"),
                     lambda: other.put(f"/domains/{name}/outbound", json={})):
            resp = call()
            assert resp.status_code == 409 and resp.json()["error"]["code"] == "sender_domain_not_owned", resp.text
        assert other.get(f"/domains/{name}/outbound").status_code == 404


def test_ses_unreachable_is_503_without_provider_details(ses_sys: SesSystem) -> None:
    """Runs last: it stops the moto server."""
    with ses_sys.tenant() as t:
        verified = domain()
        assert t.post(f"/domains/{verified}/ses-verify").status_code == 200
        ses_sys.moto.stop()
        fresh = domain()
        for resp in (t.post(f"/domains/{fresh}/ses-verify"), t.get(f"/domains/{verified}/ses-status")):
            assert resp.status_code == 503, resp.text
            err = resp.json()
            assert err["ok"] is False and err["error"]["code"] == "ses_unavailable"
            for leak in ("127.0.0.1", "botocore", "amazonaws.com", "Endpoint", AWS_SECRET):
                assert leak not in resp.text
        # nothing was recorded for the domain SES never saw
        assert t.get(f"/domains/{fresh}/outbound").status_code == 404
    # the AWS secret key is nowhere in any service's log
    logs = wait_until(lambda: list(ses_sys.system.logs_dir.glob("*.log")), 60, what="service logs")
    for path in logs:
        assert AWS_SECRET not in path.read_text(errors="replace"), path.name
