"""Inbound pieces without servers: correlation, event building, report items, IMAP position logic."""

from __future__ import annotations

import asyncio
from typing import Any

from services.inbound.classify import Hint, analyse
from services.inbound.correlate import correlate, events_for, pec_timeout_event
from services.inbound.imap_poller import new_uids, start_uid
from services.reporter.protocol import report_item
from tests.unit.test_dsn import POSTFIX

KNOWN = {"tenant_id": "acme", "id": "m-1", "pk": "0b7c-pk", "account_id": "main", "from_addr": "app@acme.test",
         "recipients": ["bob@example.test"]}


async def _lookup(tenant_id: str | None, message_id: str | None, pk: str | None) -> dict[str, Any] | None:
    if (tenant_id, message_id) == ("acme", "m-1") or pk == "0b7c-pk":
        return KNOWN
    return None


def test_correlation_by_headers_then_generated_message_id() -> None:
    t = asyncio.run(correlate(Hint("acme", "m-1", None), _lookup))
    assert t is not None and (t.tenant_id, t.message_id, t.pk, t.account_id, t.sender_domain) == (
        "acme", "m-1", "0b7c-pk", "main", "acme.test")
    assert asyncio.run(correlate(Hint(None, None, "<0b7c-pk@acme.test>"), _lookup)) is not None
    # headers naming another tenant than the Message-ID's message: nothing
    assert asyncio.run(correlate(Hint("evil", "x", "<0b7c-pk@acme.test>"), _lookup)) is None
    assert asyncio.run(correlate(Hint(None, None, None), _lookup)) is None


def test_bounce_events_are_deterministic_and_reported() -> None:
    a = analyse(POSTFIX.encode())
    target = asyncio.run(correlate(a.hint, _lookup))
    assert target is not None
    [ev] = events_for(a, target, "raw1", "smtp", now_ms=1_700_000_000_000)
    assert events_for(a, target, "raw1", "smtp")[0]["event_id"] == ev["event_id"]
    assert ev["type"] == "bounce" and ev["source"] == "dsn-smtp" and ev["bounce_type"] == "hard"
    item = report_item(ev)
    assert item == {"id": "m-1", "tenant_id": "acme", "pk": "0b7c-pk", "bounce_ts": 1_700_000_000.0,
                    "bounce_type": "hard", "bounce_code": "5.1.1", "bounce_reason": ev["bounce_reason"],
                    "recipient_email": "bob@example.test"}


def test_pec_timeout_event_report() -> None:
    ev = pec_timeout_event({"tenant_id": "acme", "message_id": "m-1", "pk": "p", "account_id": "main",
                            "sender_domain": "acme.pec.it"}, now_ms=1_700_000_000_000)
    assert ev["event_id"] == pec_timeout_event({"tenant_id": "acme", "message_id": "m-1", "pk": "p"})["event_id"]
    assert report_item(ev) == {"id": "m-1", "tenant_id": "acme", "pk": "p", "pec_event": "pec_timeout",
                               "pec_ts": 1_700_000_000.0}


def test_imap_position() -> None:
    assert start_uid(None, 7) == 0
    assert start_uid({"uidvalidity": 7, "last_uid": 42}, 7) == 42
    assert start_uid({"uidvalidity": 6, "last_uid": 42}, 7) == 0  # renumbered mailbox: read again
    assert new_uids([b"40 41 43 44"], 42) == [43, 44]
    assert new_uids([b"42"], 42) == []  # "43:*" matches the newest message even below 43
    assert new_uids([None], 0) == []
