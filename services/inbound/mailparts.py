"""Small helpers over the stdlib ``email`` package shared by the DSN, ARF and PEC parsers."""

from __future__ import annotations

import email
import email.message
import re
from email.header import decode_header, make_header

Message = email.message.Message

ADDRESS = re.compile(r"[A-Za-z0-9._%+=\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    try:
        return str(make_header(decode_header(str(value)))).strip()
    except (UnicodeError, LookupError, ValueError):
        return str(value).strip()


def report_type(msg: Message) -> str | None:
    """``delivery-status`` / ``feedback-report`` for a multipart/report, else None."""
    if msg.get_content_type() != "multipart/report":
        return None
    rt = msg.get_param("report-type")
    return str(rt).lower() if isinstance(rt, str) else None


def field_blocks(part: Message) -> list[dict[str, str]]:
    """The header-like field blocks of a message/delivery-status or message/feedback-report part, as
    dicts with lower-case names (the stdlib parses the first into Message objects, the second into
    one sub-message or plain text depending on the version)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for sub in payload:
            if isinstance(sub, Message):
                blocks.append({k.lower(): str(v).strip() for k, v in sub.items()})
        return [b for b in blocks if b]
    text = part.get_payload(decode=True) or b""
    return _text_blocks(text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))


def _text_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur, last = {}, None
        elif line[:1] in " \t" and last:
            cur[last] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            cur[last] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def embedded_headers(msg: Message) -> Message | None:
    """The original message's headers carried in a report: a text/rfc822-headers or message/rfc822
    (or message/rfc822-headers) part, searched depth-first."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return email.message_from_bytes(data.lstrip(b"\r\n"))
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
    return None


def body_text(msg: Message, limit: int = 200_000) -> str:
    """Every text/plain part (outside embedded messages) concatenated: the human-readable part of a
    bounce, for the heuristics."""
    out: list[str] = []
    for part in _walk_outer(msg):
        if part.get_content_maintype() == "text":
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    out.append(data.decode(charset, "replace"))
                except LookupError:
                    out.append(data.decode("utf-8", "replace"))
    return "\n".join(out)[:limit]


def _walk_outer(msg: Message) -> list[Message]:
    """Parts of ``msg`` without descending into embedded messages (message/rfc822)."""
    if msg.get_content_maintype() == "message":
        return []
    if not msg.is_multipart():
        return [msg]
    out: list[Message] = []
    for sub in msg.get_payload():
        if isinstance(sub, Message):
            out.extend(_walk_outer(sub))
    return out


def bare_address(value: str | None) -> str | None:
    """``rfc822; <Bob@Example.com>`` -> ``bob@example.com``."""
    if not value:
        return None
    if ";" in value:
        value = value.split(";", 1)[1]
    m = ADDRESS.search(value)
    return m.group(0).lower() if m else None
