"""The inbound SMTP listener (aiosmtpd) of the bounce return-path domain: accepts any recipient,
answers 250 once the message and its events are on the broker, 451 when they could not be stored
(the sending MTA retries), 552 above the size limit."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from services.inbound.service import Inbound

log = logging.getLogger("postbus.inbound.smtp")


class Handler:
    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        try:
            await self.inbound.handle(bytes(data), "smtp", envelope.mail_from or None, list(envelope.rcpt_tos))
        except Exception:
            log.exception("inbound message not stored")
            return "451 4.3.0 Temporary failure, try again later"
        return "250 2.0.0 OK"


async def serve(inbound: Inbound, host: str, port: int, max_bytes: int) -> Any:
    loop = asyncio.get_running_loop()
    factory = partial(SMTP, Handler(inbound), data_size_limit=max_bytes, enable_SMTPUTF8=True,
                      decode_data=False, hostname="postbus-inbound", ident="Postbus inbound")
    server = await loop.create_server(factory, host=host, port=port)
    log.info("inbound SMTP listening", extra={"host": host, "port": port})
    return server
