"""Which message an inbound report is about, and the delivery events it becomes.

Correlation order: the ``X-Postbus-Message-Id`` + ``X-Postbus-Tenant`` headers of the original (an
embedded part, or quoted in the text), else the VERP address the report was sent to (envelope
recipient, ``To``/``Original-Recipient``...; only with ``sender_verp_domain`` set), else the
original's ``Message-ID`` when it is the generated ``<pk@domain>``. Either way the message must
exist in the metrics service's message projection: a report naming an unknown message (or another
tenant's id) is kept raw and emits nothing, so a forged DSN cannot write events into a tenant it does
not know a real message of.

Attribution: a bounce or complaint becomes an event only for an envelope recipient of the correlated
message (services/common/feedback.py); a report naming anyone else (or nobody, for a message with
several recipients) emits nothing for that address, is logged and counted in
``postbus_inbound_feedback_refused_total{kind, reason}``. Nothing is suppressed or counted for it."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter

from services.common import verp
from services.common.feedback import attribute
from services.inbound.classify import Analysis, Hint

log = logging.getLogger("postbus.inbound.correlate")

VERP_SCAN_BYTES = 200_000
REFUSED = Counter("postbus_inbound_feedback_refused_total",
                  "bounce/complaint recipients of correlated inbound reports that were not attributed "
                  "(not a recipient of the message, or none named on a message with several)", ["kind", "reason"])


class Lookup(Protocol):
    async def __call__(self, tenant_id: str | None, message_id: str | None, pk: str | None) -> dict[str, Any] | None:
        ...


@dataclass(frozen=True)
class Target:
    tenant_id: str
    message_id: str
    pk: str | None
    account_id: str | None
    sender_domain: str | None
    recipients: frozenset[str] | None = None  # envelope recipients of the message (None: unknown)


def _pk_of(rfc_message_id: str | None) -> str | None:
    if not rfc_message_id:
        return None
    local = rfc_message_id.strip().strip("<>").rpartition("@")[0]
    return local or None


def verp_ids(raw: bytes, envelope_to: Iterable[str] | None, domain: str | None) -> tuple[str, str] | None:
    """(tenant, id) from the first VERP address at ``domain``: the envelope recipients first, then any
    in the report's text (its To, Delivered-To, Original-Recipient fields, a quoted Return-Path)."""
    if not domain:
        return None
    for addr in envelope_to or ():
        if (ids := verp.decode(addr, domain)) is not None:
            return ids
    pattern = re.compile(rf"{re.escape(verp.PREFIX)}[A-Za-z0-9_-]+=[A-Za-z0-9_-]+@{re.escape(domain)}(?![\w.-])",
                         re.IGNORECASE)
    text = raw[:VERP_SCAN_BYTES].decode("utf-8", "replace")
    for m in pattern.finditer(text):
        if (ids := verp.decode(m.group(0), domain)) is not None:
            return ids
    return None


async def correlate(hint: Hint, lookup: Lookup, verp_target: tuple[str, str] | None = None) -> Target | None:
    found = None
    if hint.tenant_id and hint.message_id:
        found = await lookup(hint.tenant_id, hint.message_id, None)
    if found is None and verp_target is not None:
        found = await lookup(verp_target[0], verp_target[1], None)
    if found is None and (pk := _pk_of(hint.rfc_message_id)):
        found = await lookup(None, None, pk)
        if found is not None and hint.tenant_id and found["tenant_id"] != hint.tenant_id:
            found = None  # the headers and the Message-ID disagree: trust neither
    if found is None:
        return None
    domain = (found.get("from_addr") or "").rpartition("@")[2].rstrip(">").lower() or None
    rcpts = found.get("recipients")
    return Target(found["tenant_id"], found["id"], found.get("pk"), found.get("account_id"), domain,
                  frozenset(str(r).lower() for r in rcpts) if isinstance(rcpts, list) else None)


def event_id(raw_id: str, index: int, kind: str) -> str:
    """Deterministic: the same report delivered twice (an MTA retrying after a temporary failure, a
    reclassification) gives the same event ids, which the analytics count once."""
    return hashlib.sha256(f"{raw_id}:{kind}:{index}".encode()).hexdigest()[:32]


def _base(t: Target, eid: str, etype: str, now_ms: int) -> dict[str, Any]:
    return {
        "event_id": eid, "type": etype, "tenant_id": t.tenant_id, "account_id": t.account_id,
        "message_id": t.message_id, "pk": t.pk, "ts": now_ms, "accepted_ts": None, "attempt": 0,
        "smtp_code": None, "error": None, "deferred_reason": None, "deferred_until": None, "batch_code": None,
        "sender_domain": t.sender_domain, "recipients": 0, "recipient": None, "bounce_type": None,
        "bounce_code": None, "bounce_reason": None, "pec_event": None, "feedback_type": None, "url": None,
        "source": None,
    }


def events_for(analysis: Analysis, target: Target, raw_id: str, channel: str,
               now_ms: int | None = None) -> list[dict[str, Any]]:
    """DeliveryEvents for one analysed report. ``channel``: ``smtp`` | ``imap``."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    out: list[dict[str, Any]] = []
    refused: dict[str, int] = {}

    def recipient_of(kind: str, named: str | None) -> str | None:
        address, reason = attribute(named, target.recipients)
        if reason is not None:
            refused[reason] = refused.get(reason, 0) + 1
            REFUSED.labels(kind, reason).inc()
        return address

    if analysis.kind == "bounce":
        for i, b in enumerate(analysis.bounces):
            if (recipient := recipient_of("bounce", b.recipient)) is None:
                continue
            ev = _base(target, event_id(raw_id, i, "bounce"), "bounce", now_ms)
            smtp = b.code if b.code and b.code.isdigit() else None
            ev.update(recipient=recipient, bounce_type=b.bounce_type, bounce_code=b.code,
                      bounce_reason=b.reason[:2000], smtp_code=int(smtp) if smtp else None,
                      source=f"dsn-{channel}")
            out.append(ev)
    elif analysis.kind == "complaint" and analysis.complaint is not None:
        if (recipient := recipient_of("complaint", analysis.complaint.recipient)) is not None:
            ev = _base(target, event_id(raw_id, 0, "complaint"), "complaint", now_ms)
            ev.update(recipient=recipient, feedback_type=analysis.complaint.feedback_type, source="arf")
            out.append(ev)
    elif analysis.kind == "pec" and analysis.pec is not None and analysis.pec.pec_event:
        ev = _base(target, event_id(raw_id, 0, "pec"), "pec", now_ms)
        ev.update(pec_event=analysis.pec.pec_event, recipient=analysis.pec.recipient,
                  error=analysis.pec.error if analysis.pec.pec_event == "pec_error" else None,
                  source=f"pec-{channel}")
        out.append(ev)
    if refused:
        # the address itself is not logged (it may be anyone's); the raw report is in the inbound topic
        log.warning("inbound feedback not attributed: it names no recipient of the correlated message",
                    extra={"kind": analysis.kind, "tenant_id": target.tenant_id, "message_id": target.message_id,
                           "raw_id": raw_id, "refused": refused})
    return out


def pec_timeout_event(row: dict[str, Any], now_ms: int | None = None) -> dict[str, Any]:
    t = Target(row["tenant_id"], row["message_id"], row.get("pk"), row.get("account_id"), row.get("sender_domain"))
    eid = hashlib.sha256(f"pec_timeout:{t.tenant_id}:{t.message_id}:{t.pk}".encode()).hexdigest()[:32]
    ev = _base(t, eid, "pec", now_ms if now_ms is not None else int(time.time() * 1000))
    ev.update(pec_event="pec_timeout", source="pec-timeout")
    return ev
