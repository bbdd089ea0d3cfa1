"""``system_mail.send`` commands: mail Postbus itself sends (provider sender verification, welcome mail)
through the operator's system SMTP account (settings ``system_smtp_*``). The API appends the command;
this is the only place that sends it.

The host is the operator's, not a tenant's, so it is not subject to the tenant network policy. The
first attempt is made while the command is being processed (Faust commits its offset only after, so
a crash before it resends it: at least once); if it fails, later attempts run in the background with
backoff (``ATTEMPTS`` in all), and a crash during those loses the mail (the user asks again: both
kinds are idempotent requests). Neither the password nor the bodies are ever logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from typing import Any

import aiosmtplib
from prometheus_client import Counter

from services.common.crypto import SecretBox
from services.common.settings import Settings

log = logging.getLogger("postbus.sender.system_mail")

ATTEMPTS = 5
SENT = Counter("postbus_system_mail_total", "System mails (provider verification, welcome) by outcome",
               ["kind", "outcome"])

Deliver = Callable[[EmailMessage], Awaitable[None]]


def build(settings: Settings, box: SecretBox, payload: dict[str, Any]) -> EmailMessage:
    msg = EmailMessage()
    sender = settings.system_smtp_from
    name = payload.get("from_name")
    msg["From"] = formataddr((name, sender)) if name else sender
    msg["To"] = payload["to"]
    msg["Subject"] = payload["subject"]
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{payload['mail_id']}@{sender.rpartition('@')[2] or 'postbus'}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(box.decrypt(payload.get("text_enc")) or "This message needs an HTML-capable mail reader.")
    msg.add_alternative(box.decrypt(payload["html_enc"]) or "", subtype="html")
    return msg


class SystemMailer:
    def __init__(self, settings: Settings, box: SecretBox, deliver: Deliver | None = None,
                 retry_base_s: float = 2.0) -> None:
        self.settings = settings
        self.box = box
        self.deliver = deliver or self._smtp
        self.retry_base_s = retry_base_s
        self._retries: set[asyncio.Task[None]] = set()

    async def _smtp(self, msg: EmailMessage) -> None:
        s = self.settings
        await aiosmtplib.send(
            msg, hostname=s.system_smtp_host, port=s.system_smtp_port,
            username=s.system_smtp_user or None, password=s.system_smtp_password or None,
            use_tls=s.system_smtp_tls == "tls", start_tls=s.system_smtp_tls == "starttls",
            # bounded: the first attempt runs while the command's partition waits
            timeout=min(s.sender_smtp_timeout_s, 10.0))

    async def handle(self, env: dict[str, Any], payload: dict[str, Any]) -> None:
        """The command handler (the ingest agent awaits it: one attempt, then background retries)."""
        kind = payload["kind"]
        if not self.settings.system_smtp_host:
            SENT.labels(kind, "not_configured").inc()
            log.error("system mail dropped: no system SMTP account configured",
                      extra={"kind": kind, "tenant_id": payload["tenant_id"], "mail_id": payload["mail_id"]})
            return
        msg = build(self.settings, self.box, payload)
        if await self._attempt(msg, payload, 1):
            return
        task = asyncio.ensure_future(self._retry(msg, payload))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _attempt(self, msg: EmailMessage, payload: dict[str, Any], attempt: int) -> bool:
        extra = {"kind": payload["kind"], "tenant_id": payload["tenant_id"], "mail_id": payload["mail_id"],
                 "attempt": attempt}
        try:
            await self.deliver(msg)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # server replies may be echoed in the exception; the password never is (aiosmtplib)
            log.warning("system mail not sent", extra={**extra, "error": type(exc).__name__,
                                                       "code": getattr(exc, "code", None)})
            return False
        SENT.labels(payload["kind"], "sent").inc()
        log.info("system mail sent", extra=extra)
        return True

    async def _retry(self, msg: EmailMessage, payload: dict[str, Any]) -> None:
        for attempt in range(2, ATTEMPTS + 1):
            await asyncio.sleep(self.retry_base_s * 2 ** (attempt - 2))
            if await self._attempt(msg, payload, attempt):
                return
        SENT.labels(payload["kind"], "failed").inc()
        log.error("system mail given up", extra={"kind": payload["kind"], "tenant_id": payload["tenant_id"],
                                                 "mail_id": payload["mail_id"], "attempts": ATTEMPTS})

    async def stop(self) -> None:
        for task in self._retries:
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
