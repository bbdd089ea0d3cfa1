"""One inbound message -> what it is (bounce, complaint, PEC receipt, unknown) and what it refers to.
Pure: no I/O, so the listener, the IMAP poller and a later reclassification share it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.common.mail_headers import CORRELATION_HEADER, TENANT_HEADER
from services.inbound.arf import Complaint, parse_arf
from services.inbound.dsn import Bounce, parse_bounces
from services.inbound.mailparts import Message, embedded_headers, header, parse
from services.inbound.pec import PecReceipt, parse_pec


@dataclass(frozen=True)
class Hint:
    """What the report tells about the original message."""

    tenant_id: str | None = None
    message_id: str | None = None  # the tenant's id (correlation header)
    rfc_message_id: str | None = None  # Message-ID header of the original, <...>


@dataclass
class Analysis:
    kind: str  # bounce | complaint | pec | unknown
    method: str = "none"  # dsn | heuristic | arf | pec | none
    hint: Hint = field(default_factory=Hint)
    bounces: list[Bounce] = field(default_factory=list)
    complaint: Complaint | None = None
    pec: PecReceipt | None = None


def _hint(original: Message | None, fallback_mid: str | None = None) -> Hint:
    if original is None:
        return Hint(rfc_message_id=fallback_mid)
    return Hint(header(original, TENANT_HEADER), header(original, CORRELATION_HEADER),
                header(original, "Message-ID") or fallback_mid)


_INLINE = {name: re.compile(rf"^{name}:[ \t]*(\S[^\r\n]*)", re.IGNORECASE | re.MULTILINE)
           for name in (CORRELATION_HEADER, TENANT_HEADER, "Message-ID")}


def _inline_hint(raw: bytes, hint: Hint) -> Hint:
    """Bounces that quote the original as plain text (Exim's "This is a copy of the message,
    including all the headers") still carry our correlation headers in the body."""
    if hint.tenant_id and hint.message_id:
        return hint
    body = raw.split(b"\r\n\r\n", 1)[-1] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[-1]
    text = body.decode("utf-8", "replace")
    found = {name: (m.group(1).strip() if (m := rx.search(text)) else None) for name, rx in _INLINE.items()}
    if not (found[CORRELATION_HEADER] and found[TENANT_HEADER]):
        return hint
    return Hint(found[TENANT_HEADER], found[CORRELATION_HEADER], hint.rfc_message_id or found["Message-ID"])


def analyse(raw: bytes, envelope_from: str | None = None) -> Analysis:
    """``envelope_from`` (the bounce's own sender) is never taken for the failed recipient."""
    msg = parse(raw)
    receipt = parse_pec(msg)
    if receipt is not None:
        # a PEC receipt names the original by Message-ID; a delivery receipt may embed the original
        hint = _hint(embedded_headers(msg), receipt.ref_message_id)
        return Analysis("pec", "pec", _inline_hint(raw, hint), pec=receipt)
    complaint = parse_arf(msg)
    if complaint is not None:
        return Analysis("complaint", "arf", _inline_hint(raw, _hint(embedded_headers(msg))), complaint=complaint)
    exclude = {envelope_from} if envelope_from else set()
    bounces, method = parse_bounces(msg, exclude)
    if method != "none":
        hint = _inline_hint(raw, _hint(embedded_headers(msg)))
        return Analysis("bounce" if bounces else "unknown", method, hint, bounces)
    return Analysis("unknown")
