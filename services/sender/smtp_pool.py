"""SMTP connections for one account, reused across messages and closed when idle."""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

log = logging.getLogger("postbus.sender.smtp")


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    user: str | None
    password: str | None
    use_tls: bool | None  # True implicit TLS, False plain, None STARTTLS when offered (implicit on 465)
    timeout_s: float
    ehlo_name: str | None
    validate_certs: bool = True


class Connection:
    """One SMTP session; a worker owns it, so there is no sharing across coroutines."""

    IDLE_CLOSE_S = 30.0

    def __init__(self, target: SmtpTarget) -> None:
        self.target = target
        self.client: aiosmtplib.SMTP | None = None
        self.last_used = 0.0

    async def _connect(self) -> aiosmtplib.SMTP:
        t = self.target
        implicit = t.use_tls is True or (t.use_tls is None and t.port == 465)
        client = aiosmtplib.SMTP(
            hostname=t.host,
            port=t.port,
            use_tls=implicit,
            start_tls=False if (t.use_tls is False or implicit) else None,
            timeout=t.timeout_s,
            local_hostname=t.ehlo_name,
            validate_certs=t.validate_certs,
            tls_context=ssl.create_default_context() if t.validate_certs else None,
        )
        await client.connect()
        if t.user:
            await client.login(t.user, t.password or "")
        return client

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        if self.client is not None and (
            not self.client.is_connected or time.monotonic() - self.last_used > self.IDLE_CLOSE_S
        ):
            await self.close()
        if self.client is None:
            self.client = await self._connect()
        try:
            _errors, _response = await self.client.sendmail(sender, recipients, data)
        except aiosmtplib.SMTPRecipientsRefused:
            await self._reset()
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                await self.close()
            else:
                await self._reset()
            raise
        except Exception:
            await self.close()
            raise
        self.last_used = time.monotonic()

    async def _reset(self) -> None:
        try:
            if self.client is not None and self.client.is_connected:
                await self.client.rset()
        except Exception:
            await self.close()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                if client.is_connected:
                    await client.quit()
            except Exception:
                client.close()
