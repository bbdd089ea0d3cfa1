"""One real system per test session: an Apache Kafka broker (KRaft) from Maven Central, the four
services as subprocesses, a recording SMTP server (aiosmtpd) and real client applications.

Tests isolate themselves by tenant id (``new_tenant`` makes a fresh tenant with its own client
app), so they share the running system instead of paying its start-up each time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.support.client_app import ClientApp
from tests.support.smtp_server import RecordingSmtpServer

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-" + uuid.uuid4().hex
SUPPORT_TOKEN = "support-" + uuid.uuid4().hex  # scopes smtp:read + tenant:read
SUPPORT_NARROW_TOKEN = "support-narrow-" + uuid.uuid4().hex  # scope smtp:read only
BI_TOKEN = "bi-" + uuid.uuid4().hex  # scope bi:read (BI aggregates API, docs/bi.md)
SUPPORT_PRINCIPALS = json.dumps([
    {"name": "alice", "token_sha256": hashlib.sha256(SUPPORT_TOKEN.encode()).hexdigest(),
     "scopes": ["smtp:read", "tenant:read"]},
    {"name": "bob", "token_sha256": hashlib.sha256(SUPPORT_NARROW_TOKEN.encode()).hexdigest(),
     "scopes": ["smtp:read"]},
    {"name": "carol-bi", "token_sha256": hashlib.sha256(BI_TOKEN.encode()).hexdigest(), "scopes": ["bi:read"]},
])


def fresh_state(name: str) -> Path:
    """An empty state folder for one test system (kept after the run with POSTBUS_KEEP_TEST_STATE=1)."""
    state = REPO / ".test-state" / f"{name}-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    return state


@contextlib.contextmanager
def running_system(state: Path, admin_token: str, env: dict[str, str],
                   kafka_heap: str = "256m") -> Iterator[LocalSystem]:
    """A whole system (own broker, topics, services) on free ports; for the session, and for the test
    modules whose settings differ from the session's. Test servers listen on loopback, so private
    targets are allowed unless ``env`` says otherwise (tests/security runs the production policy)."""
    env = {"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1", **env}
    sys_ = LocalSystem.with_free_ports(state, admin_token=admin_token, kafka_heap=kafka_heap, env=env)
    sys_.start()
    try:
        yield sys_
    finally:
        sys_.stop()
        if os.environ.get("POSTBUS_KEEP_TEST_STATE") != "1":
            shutil.rmtree(state, ignore_errors=True)


SYSTEM_MAIL_FROM = "postbus-system@mail.example.test"


@pytest.fixture(scope="session")
def system_mailbox() -> Iterator[RecordingSmtpServer]:
    """The operator's system SMTP account of the session system: the sender delivers provider
    verification and welcome mail here (services/sender/system_mail.py)."""
    with RecordingSmtpServer() as s:
        yield s


@pytest.fixture(scope="session")
def system(system_mailbox: RecordingSmtpServer) -> Iterator[LocalSystem]:
    state = fresh_state("run")
    with running_system(state, ADMIN_TOKEN, kafka_heap="320m", env={
        "POSTBUS_SYSTEM_SMTP_HOST": system_mailbox.host, "POSTBUS_SYSTEM_SMTP_PORT": str(system_mailbox.port),
        "POSTBUS_SYSTEM_SMTP_TLS": "none", "POSTBUS_SYSTEM_SMTP_FROM": SYSTEM_MAIL_FROM,
        "POSTBUS_SENDER_RETRY_BASE_S": "0.5", "POSTBUS_REPORTER_FLUSH_MS": "100",
        "POSTBUS_SUPPORT_PRINCIPALS_JSON": SUPPORT_PRINCIPALS,
        # SES webhook tests (test_ses_webhook.py): their test CA and HTTPS server on localhost
        "POSTBUS_SNS_CA_FILE": str(state / "sns-test-ca.pem"),
        "POSTBUS_SNS_CERT_HOST_PATTERN": r"^(sns\.[a-z0-9-]+\.amazonaws\.com|localhost:\d+)$",
        # IMAP bounce poller (test_bounces.py): the test dovecot's certificate, written there by the test
        "POSTBUS_INBOUND_IMAP_CA_FILE": str(state / "imap-test-ca.pem"),
        "POSTBUS_SNS_TOPIC_ARNS": "arn:aws:sns:eu-west-1:123456789012:ses",  # sns_server.TOPIC
        "POSTBUS_LOG_LEVEL": "INFO", "POSTBUS_ALLOW_PRIVATE_NETWORKS": "1",
    }) as sys_:
        yield sys_


@pytest.fixture(scope="session")
def smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer(replies={"reject@example.test": "550 5.1.1 <reject@example.test>: no such user"}) as s:
        yield s


@pytest.fixture(scope="session")
def admin(system: LocalSystem) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url("api"), headers={"X-API-Token": ADMIN_TOKEN}, timeout=30) as c:
        yield c


@dataclass
class Tenant:
    id: str
    api_key: str
    account_id: str
    client: ClientApp
    http: httpx.Client

    def message(self, mid: str, **kw: Any) -> dict[str, Any]:
        msg = {"id": mid, "tenant_id": self.id, "account_id": self.account_id, "from": f"app@{self.id}.test",
               "to": ["bob@example.test"], "subject": f"Subject {mid}", "body": f"Body of {mid}"}
        msg.update(kw)
        return msg


@contextlib.contextmanager
def tenant_factory(system: LocalSystem, admin: httpx.Client, smtp: RecordingSmtpServer, *, prefix: str = "t",
                   client_host: str = "127.0.0.1", base_host: str | None = None) -> Iterator[Callable[..., Tenant]]:
    """Makes fresh tenants of ``system``, each with its own client app (listening on ``client_host``,
    named ``base_host`` in its client_base_url) and an SMTP account at ``smtp``; stops them after."""
    made: list[Tenant] = []

    def make(**tenant_fields: Any) -> Tenant:
        client = ClientApp(token="s3cret", host=client_host).start()
        tid = tenant_fields.pop("id", None) or prefix + uuid.uuid4().hex[:10]
        base_url = f"http://{base_host or client_host}:{client.port}"
        body = {"id": tid, "name": f"Tenant {tid}", "client_base_url": base_url,
                "client_auth": {"method": "bearer", "token": "s3cret"}, **tenant_fields}
        r = admin.post("/tenant", json=body)
        assert r.status_code == 200, r.text
        key = r.json()["api_key"]
        http = httpx.Client(base_url=system.url("api"), headers={"X-API-Token": key}, timeout=30)
        r = http.post("/account", json={"id": "main", "host": smtp.host, "port": smtp.port, "use_tls": False})
        assert r.status_code == 200, r.text
        t = Tenant(tid, key, "main", client, http)
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.client.stop()
            t.http.close()


@pytest.fixture
def new_tenant(system: LocalSystem, admin: httpx.Client, smtp: RecordingSmtpServer) -> Iterator[Callable[..., Tenant]]:
    with tenant_factory(system, admin, smtp) as make:
        yield make


def internal_headers(system: LocalSystem) -> dict[str, str]:
    """The internal service credential of a test system: the metrics service's routes and the
    Prometheus ports of sender/reporter/inbound answer 401 without it."""
    return {"Authorization": f"Bearer {system.service_env()['POSTBUS_INTERNAL_TOKEN']}"}


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")
