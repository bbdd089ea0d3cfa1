"""Shared helpers of the provider API tests (test_provider_*.py): a second API process of the
session system whose DNS checks go to a loopback DNS server the test controls, the session's system
mailbox (the operator's system SMTP account: the sender delivers verification and welcome mail there),
and a client for the seed's routes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, SYSTEM_MAIL_FROM, Tenant, wait_until
from tests.integration.test_domains import _Zone, dns_server, extra_api
from tests.support.smtp_server import RecordingSmtpServer

SYSTEM_FROM = SYSTEM_MAIL_FROM


@dataclass
class ProviderApi:
    url: str
    zone: _Zone
    mailbox: RecordingSmtpServer  # the operator's system SMTP account delivers here
    admin: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.admin = httpx.Client(base_url=self.url, headers={"X-API-Token": ADMIN_TOKEN}, timeout=30)

    def tenant_http(self, t: Tenant) -> httpx.Client:
        """The tenant's key on this API process, once this process has read the tenant."""
        http = httpx.Client(base_url=self.url, headers={"X-API-Token": t.api_key}, timeout=30)
        wait_until(lambda: http.get(f"/tenant/{t.id}/users").status_code == 200, timeout=60,
                   what="tenant visible to the provider API process")
        return http

    def publish(self, records: list[dict[str, str]]) -> None:
        with self.zone.lock:
            for rec in records:
                self.zone.txt[rec["host"].lower()] = [*self.zone.txt.get(rec["host"].lower(), []), rec["value"]]


@dataclass
class User:
    """A provider user with a token: ``get``/``post`` add the token and (unless given) the user_id."""
    api: ProviderApi
    tenant: Tenant
    id: int
    email: str
    password: str
    token: str
    http: httpx.Client

    def get(self, path: str, **params: Any) -> httpx.Response:
        params.setdefault("user_id", self.id)
        return self.http.get(f"/api/v1/{path}", params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None, **fields: Any) -> httpx.Response:
        data = {"user_id": self.id, **(body or {}), **fields}
        return self.http.post(f"/api/v1/{path}", json={k: v for k, v in data.items() if v is not None})


def create_user(api: ProviderApi, tenant_http: httpx.Client, tenant_id: str, *, email: str | None = None,
                password: str | None = None, name: str = "Demo User") -> dict[str, Any]:
    email = email or f"u{uuid.uuid4().hex[:10]}@users.example.test"
    password = password or "pw-" + uuid.uuid4().hex
    r = tenant_http.post(f"/tenant/{tenant_id}/users", json={"email": email, "name": name, "password": password})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["user"]["email"] == email and isinstance(body["user"]["id"], int)
    return {**body["user"], "password": password}


def token_for(api: ProviderApi, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{api.url}/api/smtp-token-generate", json={"email": email, "password": password},
                      headers={"Accept": "application/json"}, timeout=30)


def login(api: ProviderApi, t: Tenant, tenant_http: httpx.Client | None = None, **kw: Any) -> User:
    own = tenant_http or api.tenant_http(t)
    u = create_user(api, own, t.id, **kw)
    r = token_for(api, u["email"], u["password"])
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    http = httpx.Client(base_url=api.url, timeout=30,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    return User(api, t, u["id"], u["email"], u["password"], token, http)


def provider_api_fixture(system: LocalSystem, mailbox: RecordingSmtpServer, **env: str) -> Iterator[ProviderApi]:
    """``mailbox``: the system SMTP account the system's sender was started with (``system_mailbox``)."""
    with dns_server() as (port, zone), extra_api(
            system, f"api-provider-{uuid.uuid4().hex[:6]}", POSTBUS_DNS_RESOLVERS=f"127.0.0.1:{port}",
            POSTBUS_DNS_TIMEOUT_S="2", POSTBUS_SYSTEM_SMTP_HOST=mailbox.host,
            POSTBUS_SYSTEM_SMTP_PORT=str(mailbox.port), POSTBUS_SYSTEM_SMTP_TLS="none",
            POSTBUS_SYSTEM_SMTP_FROM=SYSTEM_FROM, **env) as url:
        api = ProviderApi(url, zone, mailbox)
        try:
            yield api
        finally:
            api.admin.close()


@pytest.fixture(scope="module")
def papi(system: LocalSystem, system_mailbox: RecordingSmtpServer) -> Iterator[ProviderApi]:
    yield from provider_api_fixture(system, system_mailbox)


def domain_name() -> str:
    return f"p{uuid.uuid4().hex[:10]}.example.test"
