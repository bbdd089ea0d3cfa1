"""Who a bounce or complaint report may be attributed to (SES notifications in services/api, DSNs and
ARF reports in services/inbound): only an envelope recipient of the message Postbus sent that
the report was correlated to. A report naming anyone else is refused for that address: nothing is
suppressed, nothing counted.

``recipients`` is what the metrics service's ``/internal/inbound/resolve`` answers for the message
(to + cc + bcc, bare and lower case). ``None`` (an answer without it) refuses everything."""

from __future__ import annotations

from collections.abc import Collection
from email.utils import parseaddr

NOT_A_RECIPIENT = "not_a_recipient"  # the report names an address the message was not sent to
NO_RECIPIENT = "no_recipient"  # the report names nobody and the message had several recipients
UNKNOWN_RECIPIENTS = "unknown_recipients"  # the message's recipients are not known


def normalise(address: str | None) -> str | None:
    """``<Bob@Example.test>`` / ``Bob <bob@example.test>`` -> ``bob@example.test``; None without an @."""
    if not address:
        return None
    bare = parseaddr(str(address))[1].strip().lower()
    return bare if "@" in bare else None


def attribute(named: str | None, recipients: Collection[str] | None) -> tuple[str | None, str | None]:
    """(recipient, None) when the report may be counted for ``recipient``, else (None, reason).

    A report that names no recipient (a redacted complaint, a bounce whose text quotes no address)
    is about the message's only recipient when it had exactly one, else it is refused."""
    if recipients is None:
        return None, UNKNOWN_RECIPIENTS
    known = {r.lower() for r in recipients}
    address = normalise(named)
    if address is None:
        if named:
            return None, NOT_A_RECIPIENT
        return (next(iter(known)), None) if len(known) == 1 else (None, NO_RECIPIENT)
    return (address, None) if address in known else (None, NOT_A_RECIPIENT)
