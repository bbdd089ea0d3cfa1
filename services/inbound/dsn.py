"""Bounce parsing: RFC 3464 delivery status notifications with the standard library, and heuristics
for the non-standard bounces some MTAs still send (plain text with an SMTP reply inside).

Classification (documented in the README): a permanent failure is **hard**, a temporary one **soft**.
- a status of class 5 (``5.x.x``) is hard, except ``5.2.2`` (mailbox full), ``5.3.1`` (mail system
  full) and ``5.4.5`` (congestion), which are soft; class 4 (``4.x.x``) is soft;
- ``Action: delayed`` is soft whatever the status;
- without an enhanced status the SMTP reply code decides (5xx hard, 4xx soft), then phrases
  ("user unknown", "no such domain" hard; "quota exceeded", "mailbox full", "try again" soft).
Successful DSNs (``Action: delivered|relayed|expanded``) are not bounces and yield nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.inbound.mailparts import (
    ADDRESS,
    Message,
    bare_address,
    body_text,
    field_blocks,
    report_type,
)

STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
SMTP_CODE = re.compile(r"(?<![\d.])([45]\d\d)(?:[ \-]|$)")

# soft even though class 5: the mailbox exists but cannot take mail right now
_SOFT_DETAILS = {("2", "2"), ("3", "1"), ("4", "5")}  # mailbox full, mail system full, congestion

HARD_PHRASES = (
    "user unknown", "unknown user", "no such user", "no such recipient", "unknown recipient",
    "mailbox unavailable", "mailbox not found", "does not exist", "doesn't exist", "no mailbox",
    "recipient address rejected", "invalid recipient", "address rejected", "no such domain",
    "host not found", "domain not found", "name or service not known", "account has been disabled",
    "account disabled", "account is disabled", "user not found", "unrouteable address",
    "unroutable address", "recipient not found", "undeliverable address",
)
SOFT_PHRASES = (
    "quota exceeded", "over quota", "overquota", "mailbox full", "mailbox is full", "insufficient storage",
    "try again", "temporarily", "temporary failure", "greylist", "graylist", "deferred", "delayed",
    "too many connections", "rate limit", "resources unavailable", "exceeded storage",
)


@dataclass(frozen=True)
class Bounce:
    recipient: str | None
    bounce_type: str  # hard | soft
    code: str | None  # RFC 3463 status (5.1.1) or, without one, the SMTP reply code (550)
    reason: str  # the diagnostic text
    action: str | None = None


def classify_status(status: str, action: str | None = None) -> str:
    if action and action.lower() == "delayed":
        return "soft"
    m = STATUS.search(status)
    if not m:
        return "hard" if status.startswith("5") else "soft"
    cls, subject, detail = m.groups()
    if cls == "4":
        return "soft"
    return "soft" if (subject, detail) in _SOFT_DETAILS else "hard"


def classify_text(text: str) -> tuple[str | None, str | None]:
    """(bounce_type, code) from free text: enhanced status first, then the SMTP code, then phrases."""
    low = text.lower()
    m = STATUS.search(text)
    if m and m.group(1) in "45":
        return classify_status(m.group(0)), m.group(0)
    c = SMTP_CODE.search(text)
    if c:
        return ("hard" if c.group(1).startswith("5") else "soft"), c.group(1)
    if any(p in low for p in SOFT_PHRASES):
        return "soft", None
    if any(p in low for p in HARD_PHRASES):
        return "hard", None
    return None, None


def _diagnostic(value: str | None) -> str:
    """``smtp; 550 5.1.1 <x>: user unknown`` -> ``550 5.1.1 <x>: user unknown``."""
    if not value:
        return ""
    kind, sep, rest = value.partition(";")
    return rest.strip() if sep and " " not in kind.strip() else value.strip()


def parse_dsn(msg: Message) -> list[Bounce]:
    """Per-recipient failures of an RFC 3464 DSN (empty when ``msg`` is not one, or reports only
    successes)."""
    if report_type(msg) != "delivery-status":
        return []
    out: list[Bounce] = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = field_blocks(part)
        for block in blocks[1:] if len(blocks) > 1 else blocks:  # block 0 is per-message
            action = (block.get("action") or "").lower() or None
            if action in ("delivered", "relayed", "expanded"):
                continue
            recipient = bare_address(block.get("final-recipient") or block.get("original-recipient"))
            if recipient is None and action is None:
                continue
            status = block.get("status", "")
            reason = _diagnostic(block.get("diagnostic-code"))
            if STATUS.search(status):
                code = STATUS.search(status).group(0)  # type: ignore[union-attr]
                bounce_type = classify_status(code, action)
            else:
                bounce_type, code = classify_text(reason)
                if action == "delayed":
                    bounce_type = "soft"
                bounce_type = bounce_type or ("soft" if action == "delayed" else "hard")
            out.append(Bounce(recipient, bounce_type, code, reason or status or (action or "failed"), action))
        break
    return out


def parse_heuristic(msg: Message, exclude: set[str] | None = None) -> list[Bounce]:
    """A non-standard bounce: the first line with an SMTP reply or a known phrase gives the type and
    the reason; the recipient is the first address near it that is not the sender's own."""
    text = body_text(msg)
    skip = {a.lower() for a in (exclude or set())}
    lines = [ln.strip() for ln in text.splitlines()]
    for i, line in enumerate(lines):
        bounce_type, code = classify_text(line)
        if bounce_type is None:
            continue
        window = " ".join(lines[max(0, i - 3): i + 1])
        recipient = next((a.lower() for a in reversed(ADDRESS.findall(window))
                          if a.lower() not in skip and not _is_system(a)), None)
        return [Bounce(recipient, bounce_type, code, line[:1000])]
    return []


def _is_system(addr: str) -> bool:
    local = addr.split("@", 1)[0].lower()
    return local in ("mailer-daemon", "postmaster", "double-bounce") or local.startswith("bounce+")


def looks_like_bounce(msg: Message) -> bool:
    sender = (msg.get("From") or "").lower()
    subject = (msg.get("Subject") or "").lower()
    return (
        "mailer-daemon" in sender or "postmaster" in sender
        or any(w in subject for w in ("undeliver", "delivery status", "returned mail", "delivery failure",
                                      "failure notice", "mail delivery failed", "non remis", "not delivered"))
    )


def parse_bounces(msg: Message, exclude: set[str] | None = None) -> tuple[list[Bounce], str]:
    """(bounces, method): ``dsn`` for RFC 3464, ``heuristic`` for a recognised non-standard bounce."""
    dsn = parse_dsn(msg)
    if dsn or report_type(msg) == "delivery-status":
        return dsn, "dsn"
    if looks_like_bounce(msg) or msg.get("X-Failed-Recipients"):
        found = parse_heuristic(msg, exclude)
        failed = msg.get("X-Failed-Recipients")
        if found and failed and found[0].recipient is None:
            found = [Bounce(bare_address(failed), found[0].bounce_type, found[0].code, found[0].reason)]
        return found, "heuristic"
    return [], "none"
