"""Per-account SMTP options and VERP on a real system: ``ca_bundle_pem`` (the test server's
self-signed CA) makes a verified STARTTLS delivery work, the same account without it gets a
certificate error, ``tls_verify: false`` delivers, ``max_connections: 1`` sends held mail strictly in
priority + FIFO order over one session; with ``sender_verp_domain`` set the envelope sender is the
message's VERP address and a DSN that quotes nothing of the original is correlated by it.

Its own system: VERP is a process-wide setting of the sender and the inbound listener."""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from services.common import verp
from tests.conftest import fresh_state, running_system, wait_until
from tests.support.client_app import ClientApp
from tests.support.smtp_server import RecordingSmtpServer

ADMIN = "acct-admin-" + uuid.uuid4().hex
VERP_DOMAIN = "bounces.verp.test"


@pytest.fixture(scope="module")
def plain() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer() as s:
        yield s


@pytest.fixture(scope="module")
def starttls() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer(starttls=True, server_hostname="acct-ca.test") as s:
        yield s


@pytest.fixture(scope="module")
def options_system() -> Iterator[LocalSystem]:
    state = fresh_state("acct-options")
    with running_system(state, ADMIN, env={
        "POSTBUS_SENDER_VERP_DOMAIN": VERP_DOMAIN,
        "POSTBUS_SENDER_RETRY_BASE_S": "0.5",
        "POSTBUS_SENDER_MAX_ATTEMPTS": "2",
        "POSTBUS_SENDER_MX_LOOKUP": "0",
        "POSTBUS_REPORTER_FLUSH_MS": "100",
    }) as sys_:
        yield sys_


class T:
    def __init__(self, tid: str, http: httpx.Client, client: ClientApp) -> None:
        self.id, self.http, self.client = tid, http, client

    def send(self, *messages: dict[str, Any]) -> None:
        r = self.http.post("/commands/add-messages", json={"messages": list(messages)})
        assert r.status_code == 200 and r.json()["queued"] == len(messages), r.text

    def msg(self, mid: str, account: str = "main", **kw: Any) -> dict[str, Any]:
        return {"id": mid, "tenant_id": self.id, "account_id": account, "from": f"app@{self.id}.test",
                "to": [f"{mid.lower()}@example.test"], "subject": mid, "body": f"B {mid}", **kw}

    def report(self, mid: str, field: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: next((r for r in self.client.reports_for(mid) if field in r), None), timeout,
                          what=f"{mid} {field}")


@pytest.fixture
def tenant(options_system: LocalSystem) -> Iterator[Callable[[dict[str, dict[str, Any]]], T]]:
    made: list[T] = []

    def make(accounts: dict[str, dict[str, Any]]) -> T:
        client = ClientApp(token="tok").start()
        tid = "o" + uuid.uuid4().hex[:10]
        with httpx.Client(base_url=options_system.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin:
            r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                            "client_auth": {"method": "bearer", "token": "tok"}})
            assert r.status_code == 200, r.text
            key = r.json()["api_key"]
        http = httpx.Client(base_url=options_system.url("api"), headers={"X-API-Token": key}, timeout=30)
        for aid, spec in accounts.items():
            r = http.post("/account", json={"id": aid, **spec})
            assert r.status_code == 200, r.text
        t = T(tid, http, client)
        made.append(t)
        return t

    yield make
    for t in made:
        t.client.stop()
        t.http.close()


def test_account_ca_bundle_tls_verify_and_listing(tenant, starttls: RecordingSmtpServer) -> None:
    pem = Path(starttls.cert_path).read_text()
    base = {"host": "127.0.0.1", "port": starttls.port, "use_tls": None}
    t = tenant({"withca": {**base, "ca_bundle_pem": pem}, "noca": base, "noverify": {**base, "tls_verify": False},
                "pooled": {**base, "max_connections": 3}})
    listed = {a["id"]: a for a in t.http.get("/accounts").json()["accounts"]}
    assert listed["withca"]["ca_bundle_pem"] == pem and listed["withca"]["tls_verify"] is True
    assert listed["noverify"]["tls_verify"] is False and listed["noverify"]["ca_bundle_pem"] is None
    assert listed["pooled"]["max_connections"] == 3 and listed["noca"]["max_connections"] is None
    # not PEM certificates, or a private key: refused before anything is written
    for bad in ("not a pem", pem.replace("CERTIFICATE-----", "PRIVATE KEY-----")):
        r = t.http.post("/account", json={"id": "bad", **base, "ca_bundle_pem": bad})
        assert r.status_code == 422, r.text
    assert t.http.post("/account", json={"id": "bad", **base, "max_connections": 0}).status_code == 422
    assert "bad" not in {a["id"] for a in t.http.get("/accounts").json()["accounts"]}

    t.send(t.msg("CA", account="withca"), t.msg("NOCA", account="noca"), t.msg("NOVERIFY", account="noverify"))
    assert "sent_ts" in t.report("CA", "sent_ts") and "sent_ts" in t.report("NOVERIFY", "sent_ts")
    got = starttls.wait_for(2, timeout=60, predicate=lambda m: m.message["X-Postbus-Tenant"] == t.id)
    assert {m.subject for m in got} == {"CA", "NOVERIFY"} and all(m.tls for m in got)
    # the account without the CA: verification fails (retried, then given up), nothing delivered
    failed = t.report("NOCA", "error_ts")
    reasons = [failed["error"]] + [r.get("deferred_reason") or "" for r in t.client.reports_for("NOCA")]
    assert any("certificate" in r.lower() for r in reasons), reasons
    assert "NOCA" not in {m.subject for m in starttls.messages}


def test_max_connections_one_sends_held_mail_in_priority_fifo_order(tenant, plain: RecordingSmtpServer) -> None:
    t = tenant({"one": {"host": plain.host, "port": plain.port, "use_tls": False, "max_connections": 1}})
    assert t.http.post("/commands/suspend").status_code == 200
    priorities = [3, 2, 3, 0, 1, 3, 2, 0, 1, 3]
    batches = [range(0, 4), range(4, 7), range(7, 10)]  # three add-messages calls: FIFO across calls too
    for batch in batches:
        t.send(*(t.msg(f"H{i}", account="one", priority=priorities[i]) for i in batch))
    wait_until(lambda: len(t.http.get("/messages").json()["messages"]) == 10, timeout=60, what="10 held messages")
    assert t.http.post("/commands/activate").status_code == 200

    def arrivals() -> list[Any]:
        return [m for m in plain.messages if m.message["X-Postbus-Tenant"] == t.id]

    got = wait_until(lambda: len(a := arrivals()) == 10 and a, timeout=60, what="10 deliveries")
    expected = [f"H{i}" for i in sorted(range(10), key=lambda i: (priorities[i], i))]
    assert [m.subject for m in got] == expected
    assert len({m.peer for m in got}) == 1  # one pooled session carried them all


def _bare_dsn(to: str, rcpt: str) -> str:
    """An RFC 3464 DSN quoting nothing of the original (no headers, no body)."""
    return (
        f"From: MAILER-DAEMON@mx.example.test\r\nTo: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n"
        "--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: User unknown\r\n\r\n--b1--\r\n"
    )


def test_verp_return_path_correlates_a_bare_dsn(tenant, options_system: LocalSystem,
                                                plain: RecordingSmtpServer) -> None:
    t = tenant({"main": {"host": plain.host, "port": plain.port, "use_tls": False}})
    t.send(t.msg("V.Env", return_path="ignored@example.test"), t.msg("V_To"))
    for mid in ("V.Env", "V_To"):
        t.report(mid, "sent_ts")
    by_subject = {m.subject: m for m in plain.messages if m.message["X-Postbus-Tenant"] == t.id}
    env_addr, to_addr = verp.encode(t.id, "V.Env", VERP_DOMAIN), verp.encode(t.id, "V_To", VERP_DOMAIN)
    assert by_subject["V.Env"].mail_from == env_addr and by_subject["V_To"].mail_from == to_addr

    with smtplib.SMTP("127.0.0.1", options_system.inbound_smtp_port, timeout=30) as s:
        # found by the envelope recipient (the To header names someone else)
        s.sendmail("", [env_addr], _bare_dsn("postmaster@example.test", "v.env@example.test").encode())
        # found by the To header (delivered to a catch-all envelope address)
        s.sendmail("", [f"catchall@{VERP_DOMAIN}"], _bare_dsn(to_addr, "v_to@example.test").encode())
    for mid in ("V.Env", "V_To"):
        bounce = t.report(mid, "bounce_ts")
        assert bounce["bounce_type"] == "hard" and bounce["bounce_code"] == "5.1.1", bounce
        assert bounce["recipient_email"] == f"{mid.lower()}@example.test"
