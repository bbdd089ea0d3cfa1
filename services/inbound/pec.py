"""PEC receipts (Posta Elettronica Certificata, Italian certified mail, DPR 68/2005 technical rules).

A PEC provider answers each message with receipts carrying ``X-Ricevuta: <kind>`` and
``X-Riferimento-Message-ID: <Message-ID of the original>``. Mapping to ``pec_event``:

- ``accettazione`` -> ``pec_acceptance`` (the sender's provider accepted the message)
- ``avvenuta-consegna`` -> ``pec_delivery`` (delivered to the recipient's PEC mailbox)
- ``non-accettazione``, ``mancata-consegna``, ``preavviso-errore-consegna``, ``rilevazione-virus``,
  ``errore-consegna`` -> ``pec_error``
- ``presa-in-carico`` (taken in charge by the recipient's provider) is an intermediate step: kept in
  the raw topic, not reported.

No acceptance within the configured timeout -> ``pec_timeout`` (see ``pec_timeout.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from services.inbound.mailparts import Message, bare_address, header

PEC_EVENTS = {
    "accettazione": "pec_acceptance",
    "avvenuta-consegna": "pec_delivery",
    "non-accettazione": "pec_error",
    "mancata-consegna": "pec_error",
    "preavviso-errore-consegna": "pec_error",
    "rilevazione-virus": "pec_error",
    "errore-consegna": "pec_error",
}


@dataclass(frozen=True)
class PecReceipt:
    kind: str  # the X-Ricevuta value
    pec_event: str | None  # None for intermediate receipts
    ref_message_id: str | None  # X-Riferimento-Message-ID, with angle brackets
    recipient: str | None  # X-Destinatari / the recipient the receipt is about (first one)
    error: str | None  # X-VerificaSicurezza / subject text for errors


def parse_pec(msg: Message) -> PecReceipt | None:
    kind = (header(msg, "X-Ricevuta") or "").strip().lower()
    if not kind:
        return None
    ref = header(msg, "X-Riferimento-Message-ID")
    if ref and not ref.startswith("<"):
        ref = f"<{ref}>"
    event = PEC_EVENTS.get(kind)
    err = header(msg, "Subject") if event == "pec_error" else None
    return PecReceipt(kind, event, ref, bare_address(header(msg, "X-Destinatari")), err)
