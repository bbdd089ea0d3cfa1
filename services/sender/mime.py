"""Message bytes without the stdlib ``email`` object model.

Building an ``EmailMessage`` costs ~0.7 ms of CPU per message (PRODUCT.md §7); this builder writes
RFC 5322 / MIME text directly (base64 for any non-ASCII or long-line body, RFC 2047 for non-ASCII
headers) and costs a few tens of microseconds for the common text/html cases."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from email.header import Header
from email.utils import formataddr, formatdate
from functools import lru_cache
from typing import Any

from services.common import verp
from services.common.mail_headers import CORRELATION_HEADER, TENANT_HEADER
from services.sender.addresses import CACHE_SIZE, parse_list, parse_one


def _is_ascii(s: str) -> bool:
    return s.isascii()


def encode_header_value(value: str) -> str:
    if _is_ascii(value):
        return value
    return Header(value, "utf-8", maxlinelen=76).encode()


@lru_cache(maxsize=CACHE_SIZE)
def format_address(raw: str) -> str:
    name, addr = parse_one(raw)
    if not name:
        return addr
    if _is_ascii(name):
        return formataddr((name, addr))
    return formataddr((name, addr), charset="utf-8")


def format_address_list(items: list[str]) -> str:
    return ", ".join(format_address(f"{n} <{a}>" if n else a) for n, a in parse_list(items))


def envelope_recipients(msg: dict[str, Any]) -> list[str]:
    return [a for _, a in parse_list([*msg["to"], *msg["cc"], *msg["bcc"]]) if a]


def envelope_sender(msg: dict[str, Any], verp_domain: str | None = None) -> str:
    """``return_path`` or ``from``; with a VERP domain, the message's own bounce address (verp.py)."""
    if verp_domain:
        return verp.encode(msg["tenant_id"], msg["id"], verp_domain)
    return parse_one(msg.get("return_path") or msg["from_addr"])[1]


def message_id_for(msg: dict[str, Any]) -> str:
    mid = msg.get("message_id")
    if mid:
        return mid if mid.startswith("<") else f"<{mid}>"
    domain = parse_one(msg["from_addr"])[1].rpartition("@")[2] or "postbus.local"
    return f"<{msg['pk']}@{domain}>"


def _body_part(content: str, subtype: str) -> bytes:
    raw = content.encode("utf-8")
    lines_ok = all(len(line) <= 990 for line in raw.split(b"\n"))
    if content.isascii() and lines_ok and "\r" not in content:
        head = f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        return head.encode() + raw.replace(b"\n", b"\r\n")
    head = f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    return head.encode() + _b64(raw)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _boundary() -> str:
    return "=_pb_" + secrets.token_hex(12)


def _attachment_part(att: dict[str, Any], content: bytes) -> bytes:
    ctype = att.get("mime_type") or "application/octet-stream"
    fname = att["filename"]
    if _is_ascii(fname) and '"' not in fname:
        disp = f'attachment; filename="{fname}"'
    else:
        from urllib.parse import quote

        disp = f"attachment; filename*=utf-8''{quote(fname)}"
    head = f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: {disp}\r\n\r\n"
    return head.encode() + _b64(content)


def decode_base64_attachment(att: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(att["storage_path"].removeprefix("base64:"), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"attachment {att['filename']!r} is not valid base64") from exc


def build_message(msg: dict[str, Any], attachments: list[tuple[dict[str, Any], bytes]] | None = None,
                  now: float | None = None) -> bytes:
    """RFC 5322 bytes for one message dict (the Avro ``Message`` record). Bcc is never written. A
    ``Date`` among the client's headers replaces the generated one (the API validated it; the other
    standard headers a client gives reach the record as its fields)."""
    extra = msg.get("headers") or {}
    own_date = bool(extra) and any(name.lower() == "date" for name in extra)
    headers = [
        f"From: {format_address(msg['from_addr'])}",
        f"To: {format_address_list(msg['to'])}",
    ]
    if msg.get("cc"):
        headers.append(f"Cc: {format_address_list(msg['cc'])}")
    if msg.get("reply_to"):
        headers.append(f"Reply-To: {format_address(msg['reply_to'])}")
    headers += [
        f"Subject: {encode_header_value(msg['subject'])}",
    ]
    if not own_date:
        headers.append(f"Date: {formatdate(now if now is not None else time.time(), usegmt=True)}")
    headers += [
        f"Message-ID: {message_id_for(msg)}",
        "MIME-Version: 1.0",
        f"{CORRELATION_HEADER}: {encode_header_value(msg['id'])}",
        f"{TENANT_HEADER}: {encode_header_value(msg['tenant_id'])}",
    ]
    for name, value in extra.items():
        headers.append(f"{name}: {encode_header_value(value)}")

    text, html = msg.get("body_text"), msg.get("body_html")
    if text is not None and html is not None:
        b = _boundary()
        body = (f"Content-Type: multipart/alternative; boundary=\"{b}\"\r\n\r\n--{b}\r\n".encode()
                + _body_part(text, "plain") + f"\r\n--{b}\r\n".encode()
                + _body_part(html, "html") + f"\r\n--{b}--\r\n".encode())
    elif html is not None:
        body = _body_part(html, "html")
    else:
        body = _body_part(text or "", "plain")

    if attachments:
        b = _boundary()
        parts = [f"Content-Type: multipart/mixed; boundary=\"{b}\"\r\n\r\n--{b}\r\n".encode(), body]
        for att, content in attachments:
            parts.append(f"\r\n--{b}\r\n".encode())
            parts.append(_attachment_part(att, content))
        parts.append(f"\r\n--{b}--\r\n".encode())
        body = b"".join(parts)

    # body starts with its own Content-* headers, so it joins the header block directly
    return ("\r\n".join(headers) + "\r\n").encode("ascii") + body
