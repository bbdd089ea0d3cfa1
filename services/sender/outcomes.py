"""Turn an SMTP exception into an outcome: temporary (retry later) or permanent (fail now).

Classification looks at the reply code AND the RFC 3463 enhanced status code when the server gives
one: the enhanced class (``4.x.x`` temporary, ``5.x.x`` permanent) is more specific than the first
digit of the reply, so a ``550 4.7.1`` is retried and a ``450 5.1.1`` is not. Timeouts, refused and
reset connections are temporary; authentication failures (535 and friends) are permanent."""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass

import aiosmtplib
from prometheus_client import Counter


@dataclass(frozen=True)
class Failure:
    temporary: bool
    code: int | None
    reason: str
    reset_connection: bool = False


_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_status(message: str | None) -> tuple[int, int, int] | None:
    """The RFC 3463 status code at the start of a reply text (``5.7.1 ...``), if any."""
    match = _ENHANCED.match(message or "")
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def is_temporary(code: int | None, message: str | None) -> bool:
    """Enhanced class first (4 temporary, 5 permanent; 2 is success and cannot be a failure), then
    the reply code's first digit. A reply without any code (a protocol oddity) is permanent."""
    enhanced = enhanced_status(message)
    if enhanced is not None and enhanced[0] in (4, 5):
        return enhanced[0] == 4
    return code is not None and 400 <= code < 500


def _text(code: int | None, message: str | None) -> str:
    return f"{code} {message or ''}".strip() if code else (message or "")


def _from_code(code: int | None, message: str) -> Failure:
    return Failure(is_temporary(code, message), code, _text(code, message), reset_connection=code == 421)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # all recipients refused: temporary only if every refusal was temporary
        refusals = exc.recipients
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in refusals)
        temporary = bool(refusals) and all(is_temporary(r.code, r.message) for r in refusals)
        return Failure(temporary, refusals[0].code if refusals else None, text)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Failure(False, exc.code, f"authentication failed: {exc.code} {exc.message}", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | ConnectionError):
        return Failure(True, None, f"connection error: {exc}", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return Failure(True, None, "SMTP timeout", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code in (530, 534, 535, 538):  # authentication required / too weak / failed
            return Failure(False, exc.code, f"authentication failed: {_text(exc.code, exc.message)}",
                           reset_connection=True)
        return _from_code(exc.code, exc.message)
    if isinstance(exc, OSError):
        return Failure(True, None, f"network error: {exc}", reset_connection=True)
    return Failure(False, None, f"{type(exc).__name__}: {exc}", reset_connection=True)


def retry_delay_s(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with +-20% jitter: base, 2*base, 4*base, ... capped."""
    delay = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return delay * random.uniform(0.8, 1.2)


def retry_due_ms(attempt: int, now_ms: int, first_ms: int | None, *, base_s: float, cap_s: float,
                 max_attempts: int, max_age_s: float) -> int | None:
    """When to try again after failed attempt number ``attempt``, or None when the message has had
    its last try: ``max_attempts`` reached, or the next try would fall past ``max_age_s`` after the
    first attempt (``first_ms``; the message's acceptance when unknown)."""
    if attempt >= max_attempts:
        return None
    due = now_ms + int(retry_delay_s(attempt, base_s, cap_s) * 1000)
    if first_ms is not None and due - first_ms > max_age_s * 1000:
        return None
    return due


RETRIES_EXHAUSTED = Counter("postbus_sender_retries_exhausted_total",
                            "Messages given up after their last retry (max attempts or max age): an error event")


def gave_up(reason: str, attempts: int) -> str:
    """The error of a message whose retries are exhausted (counted: alert-worthy, docs/operations.md)."""
    RETRIES_EXHAUSTED.inc()
    return f"{reason} (gave up after {attempts} attempts)"
