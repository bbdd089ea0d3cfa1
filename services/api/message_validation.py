"""Validation of add-messages payloads: each message is accepted (as an Avro ``Message`` dict)
or rejected with a stable, human-readable reason. Pure functions: no I/O.

Bounds per message (settings): at most ``messages_max_attachments`` attachments ("too many
attachments") and at most ``messages_max_attachment_bytes`` of decoded inline (base64) content
("attachments too large"); the request body itself is capped before parsing (api/body_limit.py).

``headers`` (genro-mail-proxy 0.6): a standard header given there overrides the message field it
corresponds to (From, To, Cc, Bcc, Reply-To, Return-Path, Subject, Message-ID; the value is
validated as that field, so every check of the field applies) and ``Date`` replaces the generated
one; a header whose value is null is dropped. Refused (``header_not_allowed``): the MIME structure
(MIME-Version, Content-Type, Content-Transfer-Encoding), DKIM-Signature and Postbus's own
``X-Postbus-*`` correlation headers; CR/LF in a value is always refused (``invalid_header``)."""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Callable
from email.utils import getaddresses, parseaddr, parsedate_tz
from typing import Any

from services.common.settings import get_settings

MAX_MESSAGES_PER_CALL = 1000
MAX_ID_LEN = 255

PRIORITY_LABELS = {"immediate": 0, "high": 1, "medium": 2, "normal": 2, "low": 3}
DEFAULT_PRIORITY = 2

# RFC 5322-ish address check: local@domain with a dotted or bracketed domain, no spaces/controls
_ADDR = re.compile(r"^[^\s@<>()\[\],;:\"]+(\.[^\s@<>()\[\],;:\"]+)*@([A-Za-z0-9\-]+\.)+[A-Za-z0-9\-]{2,}$"
                   r"|^[^\s@<>()\[\],;:\"]+@\[[0-9.:a-fA-F]+\]$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ':'
# a standard header in `headers` overrides its message field (genro 0.6: the header replaces the default)
_FIELD_HEADERS = {"from": "from", "to": "to", "cc": "cc", "bcc": "bcc", "reply-to": "reply_to",
                  "return-path": "return_path", "subject": "subject", "message-id": "message_id"}
# never from a client: the MIME structure Postbus builds, a signature it did not make, its own headers
_REFUSED_HEADERS = {"mime-version", "content-type", "content-transfer-encoding", "dkim-signature"}
_REFUSED_HEADER_PREFIXES = ("x-postbus-",)


class Rejected(ValueError):
    """A message refused with a human-readable reason; ``code`` is a stable identifier when set."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code


def normalize_priority(value: Any, default: int = DEFAULT_PRIORITY) -> int:
    """0-3 or a label; out-of-range numbers are clamped, anything else falls back to the default."""
    if value is None:
        return default
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float):
        return min(3, max(0, int(value)))
    if isinstance(value, str):
        v = value.strip().lower()
        if v in PRIORITY_LABELS:
            return PRIORITY_LABELS[v]
        try:
            return min(3, max(0, int(v)))
        except ValueError:
            return default
    return default


def valid_address(addr: str) -> bool:
    return bool(_ADDR.match(addr)) and len(addr) <= 320


def _addresses(value: Any, field: str, required: bool) -> list[str]:
    """A list or a comma-separated string of addresses ("Name <a@b>" accepted); returns raw entries."""
    if value is None or value == "" or value == []:
        if required:
            raise Rejected(f"missing {field}")
        return []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise Rejected(f"invalid {field}: must be a list of addresses or a comma-separated string")
    out: list[str] = []
    for name, addr in getaddresses(items):
        if not addr:
            continue
        if not valid_address(addr) or any(c in name for c in "\r\n"):
            raise Rejected(f"invalid address in {field}: {addr!r}")
        out.append(f"{name} <{addr}>" if name else addr)
    if not out:
        if required:
            raise Rejected(f"missing {field}")
        return []
    return out


def _single_address(value: Any, field: str, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise Rejected(f"missing {field}")
        return None
    if not isinstance(value, str):
        raise Rejected(f"invalid {field}: must be a string")
    _name, addr = parseaddr(value)
    if not addr or not valid_address(addr) or any(c in value for c in "\r\n"):
        raise Rejected(f"invalid address in {field}: {value!r}")
    return value.strip()


def _timestamp_ms(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Rejected(f"invalid {field}: must be a unix timestamp")
    try:
        seconds = float(value)
    except ValueError:
        raise Rejected(f"invalid {field}: must be a unix timestamp") from None
    if seconds < 0 or seconds > 32503680000:  # year 3000
        raise Rejected(f"invalid {field}: out of range")
    return int(seconds * 1000)


def _headers(value: Any) -> tuple[dict[str, str], dict[str, str]]:
    """``(extra headers, field overrides)``: standard headers become overrides of their message
    field (validated as that field by the caller); a null value is dropped."""
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise Rejected("invalid headers: must be an object of name -> value", code="invalid_header")
    out: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for name, val in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise Rejected(f"invalid header name {name!r}", code="invalid_header")
        lower = name.lower()
        if lower in _REFUSED_HEADERS or lower.startswith(_REFUSED_HEADER_PREFIXES):
            raise Rejected(f"header {name!r} cannot be set: Postbus writes it", code="header_not_allowed")
        if val is None:
            continue  # genro 0.6: a null header is dropped
        if isinstance(val, int | float) and not isinstance(val, bool):
            val = str(val)
        if not isinstance(val, str) or "\r" in val or "\n" in val or "\x00" in val:
            raise Rejected(f"invalid value for header {name!r} (text without CR/LF)", code="invalid_header")
        if lower in _FIELD_HEADERS:
            overrides[_FIELD_HEADERS[lower]] = val
            continue
        if lower == "date" and parsedate_tz(val) is None:
            raise Rejected(f"invalid value for header {name!r} (an RFC 5322 date)", code="invalid_header")
        out = {k: v for k, v in out.items() if k.lower() != lower}  # the last of a repeated name wins
        out[name] = val
    return out, overrides


def valid_md5(value: str) -> bool:
    """32 hex digits, or the base64 of a 16-byte MD5 digest (Content-MD5 style)."""
    v = value.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{32}", v):
        return True
    try:
        return len(base64.b64decode(v, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _optional_bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise Rejected(f"invalid {field}: must be true, false or null")


def infer_fetch_mode(storage_path: str) -> str:
    if storage_path.startswith("base64:"):
        return "base64"
    if storage_path.startswith(("http://", "https://")):
        return "http_url"
    if "://" in storage_path or storage_path.startswith("/"):
        return "storage"
    return "endpoint"


def _attachment_auth(value: Any, i: int, encrypt: Callable[[str], str | None] | None) -> dict[str, Any] | None:
    """The attachment's own fetch credentials: {method: none|bearer|basic, token | user + password}.
    The secret leaves here encrypted (it goes on the commands topic)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Rejected(f"invalid attachment #{i}: auth must be an object")
    method = str(value.get("method") or "none").lower()
    if method == "none":
        return {"method": "none", "user": None, "secret_enc": None}
    if method == "bearer":
        user, secret = None, value.get("token")
    elif method == "basic":
        user, secret = value.get("user"), value.get("password")
        if not isinstance(user, str) or not user or ":" in user or any(c in user for c in "\r\n"):
            raise Rejected(f"invalid attachment #{i}: basic auth needs a user (without ':')")
    else:
        raise Rejected(f"invalid attachment #{i}: auth method must be none, bearer or basic")
    if not isinstance(secret, str) or not secret or any(c in secret for c in "\r\n"):
        what = "token" if method == "bearer" else "password"
        raise Rejected(f"invalid attachment #{i}: {method} auth needs a {what}")
    if encrypt is None:
        raise Rejected(f"invalid attachment #{i}: auth is not accepted here")
    return {"method": method, "user": user, "secret_enc": encrypt(secret)}


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def _attachments(value: Any, encrypt: Callable[[str], str | None] | None = None) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Rejected("invalid attachments: must be a list")
    settings = get_settings()
    max_count, max_bytes = settings.messages_max_attachments, settings.messages_max_attachment_bytes
    if len(value) > max_count:
        raise Rejected(f"too many attachments: {len(value)} (the limit is {max_count} per message)",
                       code="too_many_attachments")
    out = []
    inline_bytes = 0
    for i, att in enumerate(value):
        if not isinstance(att, dict):
            raise Rejected(f"invalid attachment #{i}: must be an object")
        filename, path = att.get("filename"), att.get("storage_path")
        if not isinstance(filename, str) or not filename or any(c in filename for c in "\r\n/\\"):
            raise Rejected(f"invalid attachment #{i}: missing or bad filename")
        if not isinstance(path, str) or not path:
            raise Rejected(f"invalid attachment #{i}: missing storage_path")
        mode = att.get("fetch_mode") or infer_fetch_mode(path)
        if mode == "filesystem":  # genro 0.6's name: here a path confined to the storage root, like storage
            mode = "storage"
        if mode not in ("base64", "http_url", "endpoint", "storage"):
            raise Rejected(f"invalid attachment #{i}: unknown fetch_mode {mode!r}")
        if mode in ("http_url", "storage") and _USERINFO.match(path):  # never into the command log
            raise Rejected(f"invalid attachment #{i}: storage_path must not carry credentials (user:password@); "
                           "use the attachment's auth", code="credentials_in_url")
        md5 = att.get("content_md5")
        if md5 is not None and md5 != "" and (not isinstance(md5, str) or not valid_md5(md5)):
            raise Rejected(f"invalid attachment #{i}: content_md5 must be 32 hex digits or the base64 of a "
                           "16-byte MD5 digest", code="invalid_content_md5")
        if mode == "base64":
            try:
                inline_bytes += len(base64.b64decode(path.removeprefix("base64:"), validate=True))
            except ValueError:
                raise Rejected(f"invalid attachment #{i}: storage_path is not valid base64") from None
            if inline_bytes > max_bytes:
                raise Rejected(f"attachments too large: over {max_bytes} bytes of inline (base64) content "
                               "per message; send larger files by URL or storage", code="attachments_too_large")
        out.append({"filename": filename, "storage_path": path, "fetch_mode": mode,
                    "mime_type": att.get("mime_type") if isinstance(att.get("mime_type"), str) else None,
                    "content_md5": md5 or None,
                    "auth": _attachment_auth(att.get("auth"), i, encrypt)})
    return out


def _body(msg: dict[str, Any]) -> tuple[str | None, str | None]:
    text = msg.get("body_text", msg.get("text"))
    html = msg.get("body_html", msg.get("html"))
    body = msg.get("body")
    if body is not None:
        if not isinstance(body, str):
            raise Rejected("invalid body: must be a string")
        ctype = str(msg.get("content_type") or "plain").lower()
        if ctype in ("html", "text/html"):
            html = html if html is not None else body
        elif ctype in ("plain", "text", "text/plain"):
            text = text if text is not None else body
        else:
            raise Rejected("invalid content_type: must be plain or html")
    for name, part in (("body_text", text), ("body_html", html)):
        if part is not None and not isinstance(part, str):
            raise Rejected(f"invalid {name}: must be a string")
    if text is None and html is None:
        text = ""
    return text, html


def validate_message(
    raw: Any,
    *,
    default_priority: int,
    account_exists: Callable[[str, str], bool],
    tenant_exists: Callable[[str], bool],
    now_ms: int | None = None,
    encrypt: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Returns the Avro ``Message`` record or raises :class:`Rejected` with the reason. ``encrypt``
    seals secrets that travel with a message (attachment auth); without it such messages are refused."""
    if not isinstance(raw, dict):
        raise Rejected("message must be an object")
    mid = raw.get("id")
    if mid is None or mid == "":
        raise Rejected("missing id")
    if isinstance(mid, int) and not isinstance(mid, bool):
        mid = str(mid)
    if not isinstance(mid, str) or len(mid) > MAX_ID_LEN or any(c in mid for c in "\r\n\x00\x1f"):
        raise Rejected(f"invalid id (a string of at most {MAX_ID_LEN} characters)")
    tenant_id = raw.get("tenant_id")
    if not tenant_id or not isinstance(tenant_id, str):
        raise Rejected("missing tenant_id")
    account_id = raw.get("account_id")
    if not account_id or not isinstance(account_id, str):
        raise Rejected("missing account_id")
    headers, overrides = _headers(raw.get("headers"))
    if overrides:  # a standard header given in `headers` replaces the field (genro 0.6)
        raw = {**raw, **overrides}
    from_addr = _single_address(raw.get("from", raw.get("from_addr")), "from", required=True)
    to = _addresses(raw.get("to"), "to", required=True)
    cc = _addresses(raw.get("cc"), "cc", required=False)
    bcc = _addresses(raw.get("bcc"), "bcc", required=False)
    subject = raw.get("subject")
    if subject is None:
        raise Rejected("missing subject")
    if not isinstance(subject, str) or "\r" in subject or "\n" in subject:
        raise Rejected("invalid subject (text without CR/LF)")
    text, html = _body(raw)
    message_id = raw.get("message_id")
    if message_id is not None and (not isinstance(message_id, str) or any(c in message_id for c in "\r\n")):
        raise Rejected("invalid message_id")
    batch_code = raw.get("batch_code")
    if batch_code is not None and (not isinstance(batch_code, str) or len(batch_code) > 255):
        raise Rejected("invalid batch_code")
    record = {
        "id": mid,
        "pk": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "account_id": account_id,
        "from_addr": from_addr,
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "reply_to": _single_address(raw.get("reply_to"), "reply_to", required=False),
        "return_path": _single_address(raw.get("return_path"), "return_path", required=False),
        "subject": subject,
        "body_text": text,
        "body_html": html,
        "headers": headers,
        "message_id": message_id or None,
        "attachments": _attachments(raw.get("attachments"), encrypt),
        "priority": normalize_priority(raw.get("priority"), default_priority),
        "deferred_ts": _timestamp_ms(raw.get("deferred_ts"), "deferred_ts"),
        "batch_code": batch_code or None,
        "track_opens": _optional_bool(raw.get("track_opens"), "track_opens"),
        "track_clicks": _optional_bool(raw.get("track_clicks"), "track_clicks"),
        "accepted_ts": now_ms if now_ms is not None else int(time.time() * 1000),
    }
    # existence checks last: the cheap shape errors above are more useful to report first
    if not tenant_exists(tenant_id):
        raise Rejected("tenant not found")
    if not account_exists(tenant_id, account_id):
        raise Rejected("account not found for tenant")
    return record
