"""ARF complaint reports (RFC 5965): ``multipart/report; report-type=feedback-report`` with a
``message/feedback-report`` part (``Feedback-Type: abuse``, ``Original-Rcpt-To``, ...) and the
original message (or its headers)."""

from __future__ import annotations

from dataclasses import dataclass

from services.inbound.mailparts import Message, bare_address, field_blocks, report_type


@dataclass(frozen=True)
class Complaint:
    feedback_type: str  # abuse | fraud | virus | not-spam | other | ...
    recipient: str | None  # the complaining recipient (Original-Rcpt-To), when the report names one
    user_agent: str | None = None


def parse_arf(msg: Message) -> Complaint | None:
    if report_type(msg) != "feedback-report":
        return None
    for part in msg.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        fields: dict[str, str] = {}
        for block in field_blocks(part):
            fields.update(block)
        ftype = (fields.get("feedback-type") or "other").strip().lower()[:64] or "other"
        return Complaint(ftype, bare_address(fields.get("original-rcpt-to")), fields.get("user-agent"))
    return Complaint("other", None)
