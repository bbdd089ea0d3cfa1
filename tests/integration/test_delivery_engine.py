"""Delivery engine against real SMTP servers: retry classification (reply + enhanced codes), the
attempt count when giving up, AUTH failures, STARTTLS and implicit TLS verified with a test CA,
rate limits (defer to the window boundary, reject, tenant-wide), destination throttling.

Its own system: the sender needs the test CA (``sender_ca_bundle``), a 10 s "minute"
(``sender_rate_minute_s``, testing only) and a per-site override for ``slow.test``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import fresh_state, running_system, wait_until
from tests.support.client_app import ClientApp
from tests.support.smtp_server import FailFirst, RecordingSmtpServer

ADMIN = "engine-admin-" + uuid.uuid4().hex
MINUTE_S = 10  # the sender's "minute" in this module


class Servers:
    def __init__(self) -> None:
        # distinct certificate subjects: one CA bundle holds both self-signed certificates
        self.plain = RecordingSmtpServer().start()
        self.starttls = RecordingSmtpServer(starttls=True, server_hostname="starttls.test").start()
        self.implicit = RecordingSmtpServer(implicit_tls=True, server_hostname="implicit.test").start()
        # AUTH is only sent over TLS (no allow_insecure_auth): STARTTLS with a certificate in the bundle
        self.auth = RecordingSmtpServer(auth=("mailer", "right-password"), starttls=True,
                                        server_hostname="auth.test").start()

    def stop(self) -> None:
        for s in (self.plain, self.starttls, self.implicit, self.auth):
            s.stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(servers: Servers) -> Iterator[LocalSystem]:
    state = fresh_state("engine")
    bundle = state / "test-ca.pem"
    bundle.write_bytes(b"".join(Path(s.cert_path).read_bytes() for s in (servers.starttls, servers.implicit,
                                                                          servers.auth)))
    with running_system(state, ADMIN, env={
        "POSTBUS_SENDER_RETRY_BASE_S": "0.3",
        "POSTBUS_SENDER_MAX_ATTEMPTS": "3",
        "POSTBUS_SENDER_CA_BUNDLE": str(bundle),
        "POSTBUS_SENDER_RATE_MINUTE_S": str(MINUTE_S),
        "POSTBUS_SENDER_MX_LOOKUP": "0",
        "POSTBUS_SENDER_SITE_OVERRIDES_JSON": '{"slow.test": {"per_minute": 2}}',
        "POSTBUS_REPORTER_FLUSH_MS": "100",
    }) as sys_:
        yield sys_


class T:
    def __init__(self, tid: str, http: httpx.Client, client: ClientApp) -> None:
        self.id, self.http, self.client = tid, http, client

    def send(self, *messages: dict[str, Any]) -> None:
        r = self.http.post("/commands/add-messages", json={"messages": list(messages)})
        assert r.status_code == 200 and r.json()["queued"] == len(messages), r.text

    def msg(self, mid: str, to: str, account: str = "main", **kw: Any) -> dict[str, Any]:
        return {"id": mid, "tenant_id": self.id, "account_id": account, "from": f"app@{self.id}.test",
                "to": [to], "subject": f"S {mid}", "body": f"B {mid}", **kw}

    def final(self, mid: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: next((r for r in self.client.reports_for(mid)
                                        if "sent_ts" in r or "error_ts" in r), None), timeout, what=f"{mid} final")

    def deferrals(self, mid: str) -> list[dict[str, Any]]:
        return [r for r in self.client.reports_for(mid) if "deferred_ts" in r]


@pytest.fixture
def tenant(engine: LocalSystem, servers: Servers) -> Iterator[Callable[..., T]]:
    made: list[T] = []

    def make(accounts: dict[str, dict[str, Any]] | None = None, **fields: Any) -> T:
        client = ClientApp(token="tok").start()
        tid = "e" + uuid.uuid4().hex[:10]
        with httpx.Client(base_url=engine.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin:
            r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                            "client_auth": {"method": "bearer", "token": "tok"}, **fields})
            assert r.status_code == 200, r.text
            key = r.json()["api_key"]
        http = httpx.Client(base_url=engine.url("api"), headers={"X-API-Token": key}, timeout=30)
        for aid, spec in (accounts or {"main": {}}).items():
            body = {"id": aid, "host": servers.plain.host, "port": servers.plain.port, "use_tls": False, **spec}
            r = http.post("/account", json=body)
            assert r.status_code == 200, r.text
        t = T(tid, http, client)
        made.append(t)
        return t

    yield make
    for t in made:
        t.client.stop()
        t.http.close()


def _rcpts(server: RecordingSmtpServer, addr: str) -> list[str]:
    return [a.reply for a in server.rcpt_attempts if a.rcpt.lower() == addr]


def test_temporary_failures_are_retried_then_sent(tenant, servers: Servers) -> None:
    t = tenant()
    cases = {"grey": "451 4.7.1 greylisted, come back later", "full": "452 4.2.2 mailbox full",
             "closing": "421 4.3.2 service shutting down", "odd": "550 4.7.1 temporarily refused"}
    for name, reply in cases.items():
        servers.plain.set_reply(f"{name}-{t.id}@example.test", FailFirst(1, reply))
    t.send(*(t.msg(name, f"{name}-{t.id}@example.test") for name in cases))
    for name, reply in cases.items():
        final = t.final(name)
        assert "sent_ts" in final, final
        [deferred] = t.deferrals(name)
        assert reply in deferred["deferred_reason"] and deferred["smtp_code"] == int(reply[:3])
        assert deferred["deferred_ts"] <= final["sent_ts"]
        assert len(servers.plain.messages_to(f"{name}-{t.id}@example.test")) == 1


def test_permanent_failures_fail_at_once(tenant, servers: Servers) -> None:
    t = tenant()
    cases = {"denied": "550 5.7.1 relaying denied", "spam": "554 5.7.1 message rejected as spam",
             "unknown": "450 5.1.1 no such user"}  # a 4xx reply with a 5.x.x enhanced code is permanent
    for name, reply in cases.items():
        servers.plain.set_reply(f"{name}-{t.id}@example.test", reply)
    t.send(*(t.msg(name, f"{name}-{t.id}@example.test") for name in cases))
    for name, reply in cases.items():
        final = t.final(name)
        assert final["error"].startswith(f"{name}-{t.id}@example.test: {reply[:3]}"), final
        assert final["smtp_code"] == int(reply[:3])
        assert t.deferrals(name) == []
        assert len(_rcpts(servers.plain, f"{name}-{t.id}@example.test")) == 1  # never tried again


def test_gives_up_after_the_last_attempt(tenant, servers: Servers) -> None:
    t = tenant()
    addr = f"never-{t.id}@example.test"
    servers.plain.set_reply(addr, "451 4.7.1 still greylisted")
    t.send(t.msg("never", addr))
    final = t.final("never")
    assert final["error"].endswith("(gave up after 3 attempts)"), final
    assert "451" in final["error"]
    assert len(t.deferrals("never")) == 2
    assert len(_rcpts(servers.plain, addr)) == 3


def test_auth_failure_is_permanent_and_auth_success_sends(tenant, servers: Servers) -> None:
    srv = servers.auth
    t = tenant({"bad": {"host": srv.host, "port": srv.port, "user": "mailer", "password": "wrong"},
                "good": {"host": srv.host, "port": srv.port, "user": "mailer", "password": "right-password"}})
    t.send(t.msg("bad-1", "x@example.test", account="bad"), t.msg("good-1", "y@example.test", account="good"))
    final = t.final("bad-1")
    assert "authentication failed" in final["error"] and final["smtp_code"] == 535
    assert t.deferrals("bad-1") == []
    assert "sent_ts" in t.final("good-1")
    [got] = srv.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Message-Id"] == "good-1")
    assert got.auth_user == "mailer" and got.tls


def test_starttls_and_implicit_tls_are_verified_with_the_ca_bundle(tenant, servers: Servers) -> None:
    t = tenant({"starttls": {"host": "127.0.0.1", "port": servers.starttls.port, "use_tls": None},
                "implicit": {"host": "127.0.0.1", "port": servers.implicit.port, "use_tls": True}})
    t.send(t.msg("via-starttls", "a@example.test", account="starttls"),
           t.msg("via-implicit", "b@example.test", account="implicit"))
    assert "sent_ts" in t.final("via-starttls") and "sent_ts" in t.final("via-implicit")
    [m1] = servers.starttls.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Tenant"] == t.id)
    [m2] = servers.implicit.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Tenant"] == t.id)
    assert m1.tls and m2.tls


def test_an_untrusted_certificate_is_not_accepted(tenant) -> None:
    # started after the sender: its self-signed certificate is in no bundle the sender trusts
    with RecordingSmtpServer(implicit_tls=True, server_hostname="localhost") as rogue:
        t = tenant({"main": {"host": "127.0.0.1", "port": rogue.port, "use_tls": True}})
        t.send(t.msg("untrusted", "c@example.test"))
        deferred = wait_until(lambda: t.deferrals("untrusted"), 60, what="a deferral")
        reason = deferred[0]["deferred_reason"].lower()
        assert "certificate" in reason or "ssl" in reason, reason
        assert rogue.messages == []


def _window(ts: float) -> int:
    return int(ts // MINUTE_S)


def _wait_for_window_start(margin: float = 0.5) -> None:
    """Start right after a window boundary, so a burst fits in one window."""
    left = MINUTE_S - time.time() % MINUTE_S
    time.sleep(left + margin)


def test_rate_limit_defers_to_the_next_window_boundary(tenant, servers: Servers) -> None:
    t = tenant({"main": {"limit_per_minute": 3}})
    _wait_for_window_start()
    t.send(*(t.msg(f"r{i}", f"rl-{t.id}@example.test") for i in range(6)))
    finals = {f"r{i}": t.final(f"r{i}", timeout=60) for i in range(6)}
    assert all("sent_ts" in f for f in finals.values()), finals
    got = servers.plain.messages_to(f"rl-{t.id}@example.test")
    assert len(got) == 6
    per_window: dict[int, int] = {}
    for m in got:
        per_window[_window(m.received_at)] = per_window.get(_window(m.received_at), 0) + 1
    assert sorted(per_window.values()) == [3, 3], per_window
    deferred = [d for i in range(6) for d in t.deferrals(f"r{i}")]
    assert len({d["id"] for d in deferred}) == 3
    for d in deferred:
        assert d["deferred_reason"] == "rate_limit"
        assert d["deferred_until"] % MINUTE_S == 0  # the boundary of the window
        assert d["deferred_until"] > d["deferred_ts"]


def test_rate_limit_reject(tenant) -> None:
    t = tenant({"main": {"limit_per_minute": 2, "limit_behavior": "reject"}})
    _wait_for_window_start()
    t.send(*(t.msg(f"x{i}", f"rj-{t.id}@example.test") for i in range(4)))
    finals = [t.final(f"x{i}") for i in range(4)]
    assert sum("sent_ts" in f for f in finals) == 2
    assert [f["error"] for f in finals if "error_ts" in f] == ["rate_limit_exceeded"] * 2


def test_tenant_hourly_limit_spans_accounts(tenant) -> None:
    # the "hour" is 60 of this module's 10 s minutes: the third send waits far beyond this test
    hour = 60 * MINUTE_S
    if hour - time.time() % hour < 30:  # not across an "hour" boundary
        time.sleep(hour - time.time() % hour + 0.5)
    t = tenant({"a1": {}, "a2": {}}, rate_limits={"hourly": 2})
    t.send(t.msg("h1", "h@example.test", account="a1"), t.msg("h2", "h@example.test", account="a2"),
           t.msg("h3", "h@example.test", account="a1"))
    wait_until(lambda: sum(1 for i in (1, 2, 3) if any("sent_ts" in r for r in t.client.reports_for(f"h{i}"))) == 2
               and any(t.deferrals(f"h{i}") for i in (1, 2, 3)), 60, what="2 sent, 1 deferred")
    deferred = [d for i in (1, 2, 3) for d in t.deferrals(f"h{i}")]
    assert {d["deferred_reason"] for d in deferred} == {"rate_limit"}
    assert all(d["deferred_until"] % (60 * MINUTE_S) == 0 for d in deferred)


def test_destination_throttle_per_site(tenant, servers: Servers) -> None:
    t = tenant()
    _wait_for_window_start()
    t.send(*(t.msg(f"d{i}", f"user{i}@slow.test") for i in range(4)), t.msg("fast", "user@fast.test"))
    assert "sent_ts" in t.final("fast", timeout=30)
    finals = {f"d{i}": t.final(f"d{i}", timeout=60) for i in range(4)}
    assert all("sent_ts" in f for f in finals.values())
    deferred = [d for i in range(4) for d in t.deferrals(f"d{i}")]
    assert deferred and {d["deferred_reason"] for d in deferred} == {"destination_throttle"}
    windows: dict[int, int] = {}
    for m in servers.plain.messages:
        if m.message["X-Postbus-Tenant"] == t.id and m.rcpt_tos[0].endswith("@slow.test"):
            windows[_window(m.received_at)] = windows.get(_window(m.received_at), 0) + 1
    assert max(windows.values()) <= 2 and sum(windows.values()) == 4, windows
