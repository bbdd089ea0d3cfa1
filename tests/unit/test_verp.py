"""VERP return paths: encoding round trip, escaping of the separators, case-insensitive decoding, and
correlation of a DSN that quotes nothing of the original."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.common import verp
from services.inbound.classify import Hint, analyse
from services.inbound.correlate import correlate, verp_ids
from services.sender.mime import envelope_sender

DOMAIN = "bounces.postbus.test"


@pytest.mark.parametrize(("tenant", "mid"), [
    ("acme", "msg-1"), ("Acme.Corp", "A_b.C@d"), ("t=1+2", "id+with=seps"), ("x", "ünïcode-ид"),
    ("e0123456789", "0" * 128), ("a-b", "-._@"),
])
def test_round_trip(tenant: str, mid: str) -> None:
    addr = verp.encode(tenant, mid, DOMAIN)
    local, _, domain = addr.rpartition("@")
    assert domain == DOMAIN and local.startswith("bounce+")
    body = local.removeprefix("bounce+")
    assert body.count("=") == 1 and "+" not in body and "." not in body and "@" not in body
    assert verp.decode(addr, DOMAIN) == (tenant, mid)
    # a relay that changes the case of the address does not change the ids
    assert verp.decode(addr.upper(), DOMAIN) == (tenant, mid)
    assert verp.decode(f"<{addr}>", DOMAIN) == (tenant, mid)


def test_plain_ids_stay_readable() -> None:
    assert verp.encode("acme", "order-42", DOMAIN) == f"bounce+acme=order-42@{DOMAIN}"
    assert verp.encode("Acme", "a.b", DOMAIN) == f"bounce+_41cme=a_2eb@{DOMAIN}"


@pytest.mark.parametrize("addr", [
    "bounce+acme=msg@other.test", "bounce+acme@bounces.postbus.test", "bob@bounces.postbus.test",
    "bounce+ac.me=msg@bounces.postbus.test", "bounce+_zz=msg@bounces.postbus.test", "bounce+=msg@bounces.postbus.test",
    "bounce+_ff=msg@bounces.postbus.test", "", "no-at-sign",
])
def test_other_addresses_are_not_decoded(addr: str) -> None:
    assert verp.decode(addr, DOMAIN) is None


def test_envelope_sender_with_and_without_verp() -> None:
    msg = {"tenant_id": "acme", "id": "m.1", "from_addr": "App <app@acme.test>", "return_path": "rp@acme.test"}
    assert envelope_sender(msg) == "rp@acme.test"
    assert envelope_sender(msg, None) == "rp@acme.test"
    assert envelope_sender(msg, DOMAIN) == f"bounce+acme=m_2e1@{DOMAIN}"


def _bare_dsn(to: str) -> bytes:
    """An RFC 3464 DSN without any part of the original message."""
    return (
        f"From: MAILER-DAEMON@mx.example.test\r\nTo: {to}\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n"
        "Final-Recipient: rfc822; gone@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--b1--\r\n"
    ).encode()


def test_verp_ids_from_envelope_then_text() -> None:
    addr = verp.encode("acme", "Order.7", DOMAIN)
    assert verp_ids(_bare_dsn("someone@else.test"), [addr], DOMAIN) == ("acme", "Order.7")
    assert verp_ids(_bare_dsn(addr), ["catchall@" + DOMAIN], DOMAIN) == ("acme", "Order.7")
    assert verp_ids(_bare_dsn(addr), [addr], None) is None  # VERP off: nothing decoded
    assert verp_ids(_bare_dsn("x@y.test"), ["x@y.test"], DOMAIN) is None


def test_correlate_falls_back_to_verp() -> None:
    known = {("acme", "Order.7"): {"tenant_id": "acme", "id": "Order.7", "pk": "p1", "account_id": "main",
                                   "from_addr": "app@acme.test"}}
    asked: list[tuple[Any, ...]] = []

    async def lookup(tenant_id: str | None, message_id: str | None, pk: str | None) -> dict[str, Any] | None:
        asked.append((tenant_id, message_id, pk))
        return known.get((tenant_id, message_id)) if tenant_id and message_id else None

    raw = _bare_dsn(verp.encode("acme", "Order.7", DOMAIN))
    analysis = analyse(raw)
    assert analysis.kind == "bounce" and analysis.hint == Hint()
    target = asyncio.run(correlate(analysis.hint, lookup, verp_ids(raw, [], DOMAIN)))
    assert target is not None and (target.tenant_id, target.message_id, target.pk) == ("acme", "Order.7", "p1")
    assert target.sender_domain == "acme.test"
    # an address naming an unknown message correlates to nothing
    raw = _bare_dsn(verp.encode("acme", "nope", DOMAIN))
    assert asyncio.run(correlate(Hint(), lookup, verp_ids(raw, [], DOMAIN))) is None
