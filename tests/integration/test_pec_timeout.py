"""pec_timeout end to end: a message sent from a PEC domain (``pec_sender_domains``) that gets no
receipt within ``pec_timeout_s`` is reported to the client app with ``pec_event: pec_timeout``; one
whose provider issued the acceptance receipt (delivered to the inbound listener while the SMTP server
accepts the message, as a PEC provider does) is reported ``pec_acceptance`` and never times out.

Its own system: a 3 s timeout scanned every second."""

from __future__ import annotations

import smtplib
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import fresh_state, running_system, wait_until
from tests.support.client_app import ClientApp
from tests.support.smtp_server import RecordingSmtpServer

ADMIN = "pec-admin-" + uuid.uuid4().hex
PEC_DOMAIN = "pec-sender.test"
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def pec_system() -> Iterator[LocalSystem]:
    state = fresh_state("pec-timeout")
    with running_system(state, ADMIN, env={
        "POSTBUS_PEC_SENDER_DOMAINS": PEC_DOMAIN,
        "POSTBUS_PEC_TIMEOUT_S": str(TIMEOUT_S),
        "POSTBUS_PEC_SCAN_INTERVAL_S": "1",
        "POSTBUS_SENDER_MX_LOOKUP": "0",
        "POSTBUS_REPORTER_FLUSH_MS": "100",
    }) as sys_:
        yield sys_


def _acceptance(message_id: str, tenant_id: str) -> bytes:
    """A PEC "ricevuta di accettazione": it names the original by its Message-ID only."""
    return (
        f"From: posta-certificata@{PEC_DOMAIN}\r\nTo: app@{PEC_DOMAIN}\r\nSubject: ACCETTAZIONE: pec\r\n"
        f"X-Ricevuta: accettazione\r\nX-Riferimento-Message-ID: {message_id}\r\nX-Trasporto: posta-certificata\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{PEC_DOMAIN}>\r\n\r\nRicevuta di accettazione ({tenant_id})\r\n"
    ).encode()


def test_pec_timeout_only_without_an_acceptance_receipt(pec_system: LocalSystem) -> None:
    client = ClientApp(token="tok").start()
    smtp = RecordingSmtpServer().start()
    tid = "p" + uuid.uuid4().hex[:10]
    try:
        with httpx.Client(base_url=pec_system.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin:
            r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                            "client_auth": {"method": "bearer", "token": "tok"}})
            assert r.status_code == 200, r.text
            key = r.json()["api_key"]
        with httpx.Client(base_url=pec_system.url("api"), headers={"X-API-Token": key}, timeout=30) as http:
            r = http.post("/account", json={"id": "pec", "host": smtp.host, "port": smtp.port, "use_tls": False})
            assert r.status_code == 200, r.text
            assert http.post("/commands/suspend").status_code == 200

            def msg(mid: str) -> dict:
                return {"id": mid, "tenant_id": tid, "account_id": "pec", "from": f"Ufficio <app@{PEC_DOMAIN}>",
                        "to": [f"{mid}@pec.example.test"], "subject": mid, "body": "certified"}

            r = http.post("/commands/add-messages", json={"messages": [msg("answered"), msg("silent")]})
            assert r.status_code == 200 and r.json()["queued"] == 2, r.text
            listed = wait_until(lambda: len(ms := {m["id"]: m for m in http.get("/messages").json()["messages"]}) == 2
                                and ms, timeout=60, what="both messages listed")
            answered_mid = f"<{listed['answered']['pk']}@{PEC_DOMAIN}>"  # the generated Message-ID

            def provider_accepts(rcpt: str) -> None:
                """The provider's acceptance receipt reaches Postbus before the SMTP 250."""
                for _ in range(10):
                    try:
                        with smtplib.SMTP("127.0.0.1", pec_system.inbound_smtp_port, timeout=30) as s:
                            s.sendmail("", [f"app@{PEC_DOMAIN}"], _acceptance(answered_mid, tid))
                        return None
                    except smtplib.SMTPException:
                        time.sleep(0.5)  # 451: the inbound lookup lagged; a real MTA retries too
                return None

            smtp.set_reply("answered@pec.example.test", provider_accepts, stage="data")
            assert http.post("/commands/activate").status_code == 200

        delivered = smtp.wait_for(2, timeout=60)
        assert {m.subject: m.message["Message-ID"] for m in delivered}["answered"] == answered_mid

        def pec_events(mid: str) -> list[str]:
            return [r["pec_event"] for r in client.reports_for(mid) if r.get("pec_event")]

        assert wait_until(lambda: "pec_acceptance" in pec_events("answered"), timeout=60, what="acceptance")
        timeout_report = wait_until(
            lambda: next((r for r in client.reports_for("silent") if r.get("pec_event") == "pec_timeout"), None),
            timeout=60, what="pec_timeout for the silent message")
        sent = next(r for r in client.reports_for("silent") if "sent_ts" in r)
        assert timeout_report["pec_ts"] >= sent["sent_ts"] + TIMEOUT_S - 1, (timeout_report, sent)  # seconds
        assert timeout_report["tenant_id"] == tid
        time.sleep(TIMEOUT_S)  # a few more scans: the answered message still never times out
        assert pec_events("answered") == ["pec_acceptance"]
        assert pec_events("silent") == ["pec_timeout"]
    finally:
        smtp.stop()
        client.stop()
