"""Mail Postbus itself sends for the provider API (sender verification, welcome mail) through the
operator's system SMTP account (settings ``system_smtp_*``; ``make up`` points it at its local sink).

The SMTP host is the operator's, never a tenant's: a tenant only chooses the recipient address and
the content, so this connection does not go through the tenant network policy. The account's
password is never logged nor put in an error message."""

from __future__ import annotations

import logging
import uuid
from email.message import EmailMessage
from email.utils import formataddr, formatdate

import aiosmtplib

from services.api.provider.envelope import ProviderError
from services.common.settings import Settings

log = logging.getLogger("postbus.api.provider.mail")


def configured(settings: Settings) -> bool:
    return bool(settings.system_smtp_host)


def _clean_header(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ProviderError(422, "Header values may not contain line breaks.")
    return value


def build(settings: Settings, to: str, subject: str, html: str, text: str | None = None,
          from_name: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    sender = settings.system_smtp_from
    msg["From"] = formataddr((_clean_header(from_name), sender)) if from_name else sender
    msg["To"] = _clean_header(to)
    msg["Subject"] = _clean_header(subject)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{sender.rpartition('@')[2] or 'postbus'}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text or "This message needs an HTML-capable mail reader.")
    msg.add_alternative(html, subtype="html")
    return msg


async def send(settings: Settings, msg: EmailMessage, what: str) -> None:
    """Send through the system account; 503 (provider shape) when it is not configured or refuses."""
    if not configured(settings):
        raise ProviderError(503, "The system mail account is not configured; ask the operator.")
    tls = settings.system_smtp_tls
    try:
        await aiosmtplib.send(
            msg, hostname=settings.system_smtp_host, port=settings.system_smtp_port,
            username=settings.system_smtp_user or None, password=settings.system_smtp_password or None,
            use_tls=tls == "tls", start_tls=True if tls == "starttls" else False,
            timeout=settings.sender_smtp_timeout_s)
    except (aiosmtplib.SMTPException, OSError) as exc:
        # the exception text can echo server replies; never the password (aiosmtplib does not put it there)
        log.warning("system mail not sent", extra={"what": what, "error": type(exc).__name__,
                                                   "code": getattr(exc, "code", None)})
        raise ProviderError(503, "The mail could not be sent right now; try again later.") from None
    log.info("system mail sent", extra={"what": what})
