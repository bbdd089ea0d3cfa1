"""The sender's system mail (services/sender/system_mail.py): built from an encrypted payload,
sent on the first attempt or retried in the background, dropped and counted without an account."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import aiosmtplib
from cryptography.fernet import Fernet

from services.common.crypto import SecretBox
from services.common.settings import Settings
from services.sender.system_mail import SENT, SystemMailer

BOX = SecretBox(Fernet.generate_key())


def payload(kind: str = "welcome") -> dict:
    return {"tenant_id": "t1", "user_id": 7, "kind": kind, "mail_id": "abc123", "to": "owner@example.test",
            "subject": "Welcome", "from_name": "Demo Store", "html_enc": BOX.encrypt("<h1>Hi &amp; welcome</h1>"),
            "text_enc": BOX.encrypt("Hi")}


def settings(**kw: object) -> Settings:
    return Settings(system_smtp_host="127.0.0.1", system_smtp_from="no-reply@ops.example", **kw)


def count(kind: str, outcome: str) -> float:
    return SENT.labels(kind, outcome)._value.get()


async def test_sent_on_the_first_attempt_with_the_decrypted_bodies() -> None:
    got: list[EmailMessage] = []

    async def deliver(msg: EmailMessage) -> None:
        got.append(msg)

    before = count("welcome", "sent")
    await SystemMailer(settings(), BOX, deliver).handle({}, payload())
    [msg] = got
    assert msg["To"] == "owner@example.test" and msg["Message-ID"] == "<abc123@ops.example>"
    assert msg["From"] == "Demo Store <no-reply@ops.example>"
    assert msg.get_body(("html",)).get_content().strip() == "<h1>Hi &amp; welcome</h1>"
    assert msg.get_body(("plain",)).get_content().strip() == "Hi"
    assert count("welcome", "sent") == before + 1


async def test_a_refused_first_attempt_is_retried_in_the_background() -> None:
    attempts: list[int] = []
    delivered = asyncio.Event()

    async def deliver(msg: EmailMessage) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise aiosmtplib.SMTPResponseException(451, "4.3.0 try later")
        delivered.set()

    mailer = SystemMailer(settings(), BOX, deliver, retry_base_s=0.01)
    await mailer.handle({}, payload("sender-verification"))  # returns after the first (failed) attempt
    assert len(attempts) == 1 and not delivered.is_set()
    await asyncio.wait_for(delivered.wait(), 5)
    assert len(attempts) == 3
    await mailer.stop()


async def test_given_up_after_the_last_attempt_and_counted() -> None:
    async def deliver(msg: EmailMessage) -> None:
        raise OSError("connection refused")

    before = count("welcome", "failed")
    mailer = SystemMailer(settings(), BOX, deliver, retry_base_s=0.001)
    await mailer.handle({}, payload())
    await asyncio.wait_for(asyncio.gather(*mailer._retries), 5)
    assert count("welcome", "failed") == before + 1


async def test_without_a_system_account_nothing_is_sent_and_it_is_counted() -> None:
    got: list[EmailMessage] = []

    async def deliver(msg: EmailMessage) -> None:
        got.append(msg)

    configured = SystemMailer(settings(), BOX, deliver)
    await configured.handle({}, payload())  # control: with an account it is sent
    assert len(got) == 1
    before = count("welcome", "not_configured")
    await SystemMailer(Settings(system_smtp_host=None), BOX, deliver).handle({}, payload())
    assert len(got) == 1 and count("welcome", "not_configured") == before + 1
