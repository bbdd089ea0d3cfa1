"""PEC receipts (X-Ricevuta) -> pec_event, and the reference to the original Message-ID."""

from __future__ import annotations

import pytest

from services.inbound.classify import analyse


def receipt(kind: str, ref: str = "<0b7c-pk@acme.test>") -> bytes:
    return (
        "From: posta-certificata@pec.provider.test\r\nTo: app@acme.pec.test\r\n"
        f"Subject: ACCETTAZIONE: Hello\r\nX-Ricevuta: {kind}\r\nX-Riferimento-Message-ID: {ref}\r\n"
        "X-Trasporto: posta-certificata\r\nX-Destinatari: mario.rossi@pec.example.test\r\n"
        "Message-ID: <opec1.20240101@pec.provider.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nIl giorno 01/01/2024 il messaggio e' stato accettato.\r\n"
    ).encode()


@pytest.mark.parametrize(("kind", "event"), [
    ("accettazione", "pec_acceptance"),
    ("avvenuta-consegna", "pec_delivery"),
    ("mancata-consegna", "pec_error"),
    ("non-accettazione", "pec_error"),
    ("preavviso-errore-consegna", "pec_error"),
    ("presa-in-carico", None),
])
def test_receipt_kinds(kind: str, event: str | None) -> None:
    a = analyse(receipt(kind))
    assert a.kind == "pec" and a.pec is not None
    assert a.pec.kind == kind and a.pec.pec_event == event
    assert a.hint.rfc_message_id == "<0b7c-pk@acme.test>"
    assert a.pec.recipient == "mario.rossi@pec.example.test"


def test_reference_without_brackets_and_case() -> None:
    a = analyse(receipt("Avvenuta-Consegna", ref="x1@acme.test"))
    assert a.pec is not None and a.pec.pec_event == "pec_delivery"
    assert a.hint.rfc_message_id == "<x1@acme.test>"
