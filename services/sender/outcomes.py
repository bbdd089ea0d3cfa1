"""Turn an SMTP exception into an outcome: temporary (retry later) or permanent (fail now)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import aiosmtplib


@dataclass(frozen=True)
class Failure:
    temporary: bool
    code: int | None
    reason: str
    reset_connection: bool = False


def _from_code(code: int | None, message: str) -> Failure:
    if code is not None and 400 <= code < 500:
        return Failure(True, code, f"{code} {message}".strip())
    return Failure(False, code, f"{code} {message}".strip() if code else message)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # all recipients refused: temporary only if every refusal was temporary
        refusals = exc.recipients
        codes = [r.code for r in refusals]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in refusals)
        temporary = bool(codes) and all(400 <= c < 500 for c in codes)
        return Failure(temporary, codes[0] if codes else None, text)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Failure(False, exc.code, f"authentication failed: {exc.code} {exc.message}", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | ConnectionError):
        return Failure(True, None, f"connection error: {exc}", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return Failure(True, None, "SMTP timeout", reset_connection=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        failure = _from_code(exc.code, exc.message)
        return Failure(failure.temporary, failure.code, failure.reason, reset_connection=exc.code == 421)
    if isinstance(exc, OSError):
        return Failure(True, None, f"network error: {exc}", reset_connection=True)
    return Failure(False, None, f"{type(exc).__name__}: {exc}", reset_connection=True)


def retry_delay_s(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with +-20% jitter: base, 2*base, 4*base, ... capped."""
    delay = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return delay * random.uniform(0.8, 1.2)
