"""The test support servers are real servers that behave as documented."""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from tests.support.client_app import ClientApp
from tests.support.smtp_server import FailFirst, RecordingSmtpServer


def _mail(to: list[str], subject: str = "Hello", body: str = "Hi Bob") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@acme.test"
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


# ---------------------------------------------------------------------------------------- SMTP
async def test_smtp_records_accepted_message():
    with RecordingSmtpServer() as smtp:
        assert smtp.port > 0
        errors, _ = await aiosmtplib.send(
            _mail(["bob@example.test", "carol@example.test"]), hostname=smtp.host, port=smtp.port
        )
        assert errors == {}
        [msg] = await asyncio.to_thread(smtp.wait_for, 1, 5)
        assert msg.mail_from == "app@acme.test"
        assert msg.rcpt_tos == ["bob@example.test", "carol@example.test"]
        assert msg.subject == "Hello"
        assert msg.body_text().strip() == "Hi Bob"
        assert b"Subject: Hello" in msg.data
        assert msg.tls is False


async def test_smtp_scripted_rcpt_550_and_partial_accept():
    with RecordingSmtpServer(replies={"nobody@example.test": "550 5.1.1 user unknown"}) as smtp:
        # a single refused recipient: the whole send fails with the scripted code and text
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
            await aiosmtplib.send(_mail(["nobody@example.test"]), hostname=smtp.host, port=smtp.port)
        [refused] = exc.value.recipients
        assert refused.code == 550
        assert "5.1.1 user unknown" in refused.message
        # one refused among two: the other one is delivered
        errors, _ = await aiosmtplib.send(
            _mail(["nobody@example.test", "bob@example.test"]), hostname=smtp.host, port=smtp.port
        )
        assert errors["nobody@example.test"].code == 550
        [msg] = smtp.wait_for(1, 5)
        assert msg.rcpt_tos == ["bob@example.test"]
        assert [(a.rcpt, a.reply[:3]) for a in smtp.rcpt_attempts] == [
            ("nobody@example.test", "550"),
            ("nobody@example.test", "550"),
            ("bob@example.test", "250"),
        ]


async def test_smtp_scripted_temporary_failures_then_accept():
    with RecordingSmtpServer(replies={"@slow.test": FailFirst(2, "451 4.7.1 try later")}) as smtp:
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
                await aiosmtplib.send(_mail(["x@slow.test"]), hostname=smtp.host, port=smtp.port)
            assert exc.value.recipients[0].code == 451
        await aiosmtplib.send(_mail(["x@slow.test"]), hostname=smtp.host, port=smtp.port)
        assert len(smtp.wait_for(1, 5)) == 1


async def test_smtp_data_stage_reply_and_runtime_script():
    with RecordingSmtpServer() as smtp:
        smtp.set_reply("bob@example.test", "554 5.7.1 rejected as spam", stage="data")
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await aiosmtplib.send(_mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port)
        assert exc.value.code == 554
        assert smtp.messages == []
        assert smtp.rejected[0][1].startswith("554")
        smtp.clear_replies()
        await aiosmtplib.send(_mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port)
        assert len(smtp.wait_for(1, 5)) == 1


async def test_smtp_starttls_with_self_signed_certificate_and_auth():
    with RecordingSmtpServer(starttls=True, require_starttls=True, auth=("user", "pw")) as smtp:
        assert smtp.cert_path is not None and smtp.cert_path.exists()
        # verified against the generated certificate
        await aiosmtplib.send(
            _mail(["bob@example.test"], subject="secure"),
            hostname=smtp.host,
            port=smtp.port,
            start_tls=True,
            tls_context=smtp.client_tls_context(),
            username="user",
            password="pw",
        )
        [msg] = smtp.wait_for(1, 5)
        assert msg.tls is True
        assert msg.auth_user == "user"
        assert msg.subject == "secure"
        # a wrong password is refused with 535
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
            await aiosmtplib.send(
                _mail(["bob@example.test"]),
                hostname=smtp.host,
                port=smtp.port,
                start_tls=True,
                validate_certs=False,
                username="user",
                password="wrong",
            )
        assert exc.value.code == 535
        assert smtp.auth_failures >= 1  # the client may try more than one mechanism
        # without STARTTLS the server refuses to go on
        with pytest.raises(aiosmtplib.SMTPResponseException) as exc2:
            await aiosmtplib.send(_mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port, start_tls=False)
        assert exc2.value.code == 530
        assert len(smtp.messages) == 1


async def test_smtp_certificate_is_not_trusted_by_default():
    with RecordingSmtpServer(starttls=True) as smtp:
        with pytest.raises((aiosmtplib.SMTPConnectError, aiosmtplib.SMTPException, ssl.SSLError)):
            await aiosmtplib.send(_mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port, start_tls=True)
        assert smtp.messages == []


async def test_smtp_implicit_tls():
    with RecordingSmtpServer(implicit_tls=True) as smtp:
        await aiosmtplib.send(
            _mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port, use_tls=True, validate_certs=False
        )
        [msg] = smtp.wait_for(1, 5)
        assert msg.tls is True


def test_smtp_wait_for_times_out_with_a_clear_message():
    with RecordingSmtpServer() as smtp, pytest.raises(TimeoutError, match="expected 1 message"):
        smtp.wait_for(1, timeout=0.2)


# ---------------------------------------------------------------------------------------- client app
async def test_client_app_records_reports_and_answers_default():
    with ClientApp(token="s3cret") as app:
        async with httpx.AsyncClient(base_url=app.url) as http:
            body = {"delivery_report": [{"id": "m1", "sent_ts": 1}, {"id": "m2", "error_ts": 2, "error": "x"}]}
            r = await http.post("/mail-proxy/sync", json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
            assert r.json() == {"ok": True, "queued": 0}
            r = await http.post(
                "/mail-proxy/sync",
                json={"delivery_report": [{"id": "m3", "sent_ts": 3}]},
                headers={"Authorization": "Bearer s3cret"},
            )
        assert [x["id"] for x in app.reports()] == ["m1", "m2", "m3"]
        assert app.reports_for("m2")[0]["error"] == "x"
        [first, _] = app.sync_calls()
        assert first.headers["content-type"] == "application/json"
        assert first.json == body
        got = app.wait_for_reports(lambda rs: any(x["id"] == "m3" for x in rs), timeout=1)
        assert len(got) == 3
        assert app.wait_for_report(lambda x: "error" in x, timeout=1)["id"] == "m2"


async def test_client_app_rejects_wrong_or_missing_token():
    with ClientApp(token="s3cret") as app:
        async with httpx.AsyncClient(base_url=app.url) as http:
            r1 = await http.post("/mail-proxy/sync", json={"delivery_report": [{"id": "m1"}]})
            r2 = await http.post(
                "/mail-proxy/sync",
                json={"delivery_report": [{"id": "m1"}]},
                headers={"Authorization": "Bearer nope"},
            )
        assert (r1.status_code, r2.status_code) == (401, 401)
        assert app.reports() == []
        assert [r.authorized for r in app.requests] == [False, False]
        with pytest.raises(TimeoutError):
            app.wait_for_reports(1, timeout=0.2)


async def test_client_app_basic_auth_scripted_answers_and_status():
    with ClientApp(token=None, basic=("u", "p")) as app:
        app.script([(500, {"error": "boom"}), (200, {"ok": True, "queued": 5, "next_sync_after": 99})])
        async with httpx.AsyncClient(base_url=app.url, auth=("u", "p")) as http:
            r1 = await http.post("/any/path", json={"delivery_report": []})
            r2 = await http.post("/any/path", json={"delivery_report": []})
            r3 = await http.post("/any/path", json={"delivery_report": []})
            app.set_response({"ok": False}, status=503)
            r4 = await http.post("/any/path", json={})
            bad = await http.post("/any/path", json={}, auth=("u", "wrong"))
        assert [r1.status_code, r2.status_code, r3.status_code, r4.status_code] == [500, 200, 200, 503]
        assert r2.json()["queued"] == 5
        assert r3.json() == {"ok": True, "queued": 0}
        assert r4.json() == {"ok": False}
        assert bad.status_code == 401
        assert [r.path for r in app.requests] == ["/any/path"] * 5


async def test_client_app_serves_attachment_files():
    with ClientApp(token="t", files={"docs/a.pdf": b"%PDF-1.4 data"}) as app:
        async with httpx.AsyncClient(base_url=app.url, headers={"Authorization": "Bearer t"}) as http:
            ok = await http.post("/attachments", json={"storage_path": "docs/a.pdf"})
            missing = await http.post("/attachments", json={"storage_path": "docs/b.pdf"})
        assert ok.status_code == 200 and ok.content == b"%PDF-1.4 data"
        assert missing.status_code == 404


async def test_smtp_plain_auth_without_tls_on_loopback():
    with RecordingSmtpServer(auth=("user", "pw")) as smtp:
        await aiosmtplib.send(
            _mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port, username="user", password="pw"
        )
        assert smtp.wait_for(1, 5)[0].auth_user == "user"
        # auth is required: no credentials, no mail
        with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
            await aiosmtplib.send(_mail(["bob@example.test"]), hostname=smtp.host, port=smtp.port)
        assert exc.value.code == 530
        assert len(smtp.messages) == 1
