"""Issue 8, finding 7: credentials on the wire.

SMTP (a real aiosmtpd server, the session system): an account with a password never sends AUTH over
an unencrypted connection unless it opted in (``allow_insecure_auth``); with STARTTLS offered it
upgrades first, also with ``use_tls: false``; certificates are verified (a self-signed certificate
fails, the account's ``ca_bundle_pem`` makes it work).

IMAP (a real dovecot, no Postbus system needed): the poller builds a verifying TLS context, uses
STARTTLS on a non-TLS port, refuses LOGIN when the server offers no STARTTLS, and fails on an
untrusted certificate; each attack has its control in the same test."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Tenant, wait_until
from tests.support.imap_server import DovecotServer
from tests.support.smtp_server import RecordingSmtpServer

USER, PASSWORD = "mailer", "wire-pass-7f3a"


def _final(t: Tenant, mid: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in t.client.reports_for(mid) if "sent_ts" in r or "error_ts" in r),
                                   None), timeout, what=f"{mid} final report")


def _send(t: Tenant, *messages: dict[str, Any]) -> None:
    r = t.http.post("/commands/add-messages", json={"messages": list(messages)})
    assert r.status_code == 200 and r.json()["queued"] == len(messages), r.text


def _account(t: Tenant, aid: str, srv: RecordingSmtpServer, **fields: Any) -> None:
    r = t.http.post("/account", json={"id": aid, "host": srv.host, "port": srv.port, **fields})
    assert r.status_code == 200, r.text


# --- SMTP -------------------------------------------------------------------------------------------

def test_no_auth_over_a_plain_connection_without_the_explicit_opt_in(system, new_tenant) -> None:
    # a server that advertises AUTH but no STARTTLS: what a stripped STARTTLS looks like to the client
    with RecordingSmtpServer(auth=(USER, PASSWORD)) as srv:
        t: Tenant = new_tenant()
        _account(t, "optin", srv, user=USER, password=PASSWORD, use_tls=False, allow_insecure_auth=True)
        _account(t, "plain", srv, user=USER, password=PASSWORD, use_tls=False)
        _account(t, "auto", srv, user=USER, password=PASSWORD)  # use_tls unset: STARTTLS if offered
        listed = {a["id"]: a for a in t.http.get("/accounts").json()["accounts"]}
        assert listed["optin"]["allow_insecure_auth"] is True and listed["plain"]["allow_insecure_auth"] is False

        # control: the explicit opt-in authenticates in clear and delivers
        _send(t, t.message("opt-in", account_id="optin"))
        assert "sent_ts" in _final(t, "opt-in")
        [got] = srv.wait_for(1, timeout=30, predicate=lambda m: m.message["X-Postbus-Message-Id"] == "opt-in")
        assert got.auth_user == USER and not got.tls
        assert srv.auth_attempts == 1

        # the attack: without the opt-in, no AUTH, no MAIL FROM, a clear permanent error
        _send(t, t.message("no-tls", account_id="plain", to=["a@example.test"]),
              t.message("no-tls-auto", account_id="auto", to=["b@example.test"]))
        for mid in ("no-tls", "no-tls-auto"):
            final = _final(t, mid)
            assert "error_ts" in final, final
            assert "STARTTLS" in final["error"] and "allow_insecure_auth" in final["error"], final
            assert PASSWORD not in final["error"]
            assert not [r for r in t.client.reports_for(mid) if "deferred_ts" in r]  # permanent: no retry
        assert srv.auth_attempts == 1  # still only the opt-in's AUTH
        assert [a.rcpt for a in srv.rcpt_attempts] == ["bob@example.test"]
        assert len(srv.messages) == 1


def test_use_tls_false_with_a_password_upgrades_with_starttls_before_auth(system, new_tenant) -> None:
    with RecordingSmtpServer(auth=(USER, PASSWORD), starttls=True, server_hostname="auth-tls.test") as srv:
        t: Tenant = new_tenant()
        pem = Path(srv.cert_path).read_text()
        _account(t, "main", srv, user=USER, password=PASSWORD, use_tls=False, ca_bundle_pem=pem)
        _send(t, t.message("upgraded"))
        assert "sent_ts" in _final(t, "upgraded")
        [got] = srv.wait_for(1, timeout=30)
        assert got.tls and got.auth_user == USER


def test_a_self_signed_certificate_is_refused_by_default_and_trusted_with_ca_bundle_pem(system, new_tenant) -> None:
    with RecordingSmtpServer(starttls=True, server_hostname="self-signed.test") as srv:
        t: Tenant = new_tenant()
        _account(t, "default", srv, use_tls=None)
        _account(t, "withca", srv, use_tls=None, ca_bundle_pem=Path(srv.cert_path).read_text())
        # control: the account that trusts the certificate delivers over TLS
        _send(t, t.message("trusted", account_id="withca"))
        assert "sent_ts" in _final(t, "trusted")
        [got] = srv.wait_for(1, timeout=30)
        assert got.tls
        # the attack (a certificate nobody vouches for): verification fails, nothing is delivered
        _send(t, t.message("untrusted", account_id="default", to=["c@example.test"]))
        deferred = wait_until(lambda: [r for r in t.client.reports_for("untrusted") if "deferred_ts" in r],
                              60, what="a deferral")
        reason = deferred[0]["deferred_reason"].lower()
        assert "certificate" in reason or "ssl" in reason, reason
        assert "c@example.test" not in [a.rcpt for a in srv.rcpt_attempts] and len(srv.messages) == 1


# --- IMAP -------------------------------------------------------------------------------------------

def _imap_cfg(imap: DovecotServer, **kw: Any):
    from services.inbound.imap_poller import ImapConfig

    return ImapConfig(host=imap.host, port=imap.port, user=imap.user, password=imap.password, mailbox="INBOX",
                      interval_s=1.0, **kw)


def _logins(imap: DovecotServer) -> list[str]:
    return [line for line in imap.log_text().splitlines() if "Login: user=" in line]


DSN = b"From: MAILER-DAEMON@example.test\r\nTo: b@x.test\r\nSubject: bounce\r\n\r\nundeliverable\r\n"


def test_imap_poller_builds_a_verifying_context() -> None:
    from services.inbound.imap_poller import ImapConfig, tls_context

    ctx = tls_context(ImapConfig("imap.test", 993, "u", "p", "INBOX", 60.0))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True


def test_imap_poller_refuses_plaintext_login_without_starttls() -> None:
    from services.inbound.imap_poller import PlaintextLoginRefused, fetch_new

    assert DovecotServer.available(), "dovecot is not installed (apt-get install dovecot-imapd)"
    with DovecotServer() as imap:  # no TLS at all; the server itself would accept a plaintext LOGIN
        imap.append(DSN)
        before = len(_logins(imap))
        with pytest.raises(PlaintextLoginRefused) as err:
            fetch_new(_imap_cfg(imap), None, timeout_s=10)
        assert "STARTTLS" in str(err.value) and imap.password not in str(err.value)
        assert len(_logins(imap)) == before  # no LOGIN reached the server
        # control: the operator's explicit opt-in logs in and reads the message
        _, messages = fetch_new(_imap_cfg(imap, allow_plaintext_login=True), None, timeout_s=10)
        assert [raw for _, raw in messages] == [DSN]
        wait_until(lambda: len(_logins(imap)) == before + 1, 10, what="the opt-in's LOGIN in dovecot's log")


def test_imap_poller_uses_starttls_and_verifies_the_certificate() -> None:
    from services.inbound.imap_poller import fetch_new

    assert DovecotServer.available(), "dovecot is not installed (apt-get install dovecot-imapd)"
    with DovecotServer(tls=True) as imap:
        imap.append(DSN)
        before = len(_logins(imap))
        # an untrusted (self-signed) certificate: the handshake fails, no LOGIN is sent
        with pytest.raises(ssl.SSLCertVerificationError):
            fetch_new(_imap_cfg(imap), None, timeout_s=10)
        assert len(_logins(imap)) == before
        # control: with the CA configured, STARTTLS then LOGIN over TLS
        _, messages = fetch_new(_imap_cfg(imap, ca_file=str(imap.cert_path)), None, timeout_s=10)
        assert [raw for _, raw in messages] == [DSN]
        wait_until(lambda: len(_logins(imap)) == before + 1, 10, what="the LOGIN in dovecot's log")
        assert ", TLS" in _logins(imap)[-1]
