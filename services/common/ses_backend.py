"""Optional Amazon SES backend of domain verification (``POSTBUS_DOMAIN_BACKEND=ses``), via boto3.

``verify`` calls VerifyDomainIdentity + VerifyDomainDkim (the TXT token and the three DKIM CNAME
tokens SES wants published); ``status`` calls GetIdentityVerificationAttributes +
GetIdentityDkimAttributes and maps SES's statuses onto the seed's vocabulary. The boto3 client is
blocking, so every call runs in a worker thread. Credentials come from boto3's standard chain and
are never read, logged or stored here. Any SES failure becomes ``SesUnavailable`` carrying only our
own wording and an HTTP status (503: unreachable/throttled/no credentials, 502: SES answered an
error): the provider's message never reaches a caller."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("postbus.ses")

SUCCESS, PENDING, FAILED, TEMPORARY, NOT_STARTED = "Success", "Pending", "Failed", "TemporaryFailure", "NotStarted"
STATUSES = frozenset({SUCCESS, PENDING, FAILED, TEMPORARY, NOT_STARTED})
VERIFICATION_PREFIX = "_amazonses"  # fixed by SES
DKIM_TARGET = "dkim.amazonses.com"
DEFAULT_REGION = "us-east-1"
# SES error codes that mean "try again later" rather than "SES refused this request"
_RETRYABLE = frozenset({"Throttling", "ThrottlingException", "ServiceUnavailable", "InternalFailure",
                        "RequestTimeout", "RequestTimeoutException"})
# tokens go into DNS names: accept only what SES issues (base32-ish DKIM tokens, base64 TXT token)
_DKIM_TOKEN = re.compile(r"^[a-z0-9]{1,63}$")
_TXT_TOKEN = re.compile(r"^[A-Za-z0-9+/=_-]{1,255}$")


class SesUnavailable(Exception):
    """SES could not be used for this request; ``str(exc)`` is safe to show to a caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SesVerification:
    verification_token: str
    dkim_tokens: list[str]


@dataclass(frozen=True)
class SesStatus:
    verification_status: str
    dkim_status: str


def dns_records(domain: str, v: SesVerification) -> list[dict[str, str]]:
    """The records SES asks for: the TXT token at ``_amazonses.<domain>`` and one CNAME per DKIM token."""
    return [{"type": "TXT", "name": f"{VERIFICATION_PREFIX}.{domain}", "value": v.verification_token},
            *({"type": "CNAME", "name": f"{t}._domainkey.{domain}", "value": f"{t}.{DKIM_TARGET}"}
              for t in v.dkim_tokens)]


def map_status(value: Any) -> str:
    """SES's status strings are the seed's; anything else (absent identity: NotStarted, an unknown
    value) must not break the response model."""
    if value is None:
        return NOT_STARTED
    return str(value) if value in STATUSES else TEMPORARY


class SesBackend:
    """One boto3 SES client per process (clients are thread-safe; made lazily, in a worker thread)."""

    def __init__(self, region: str | None, endpoint_url: str | None, timeout_s: float) -> None:
        self.region, self.endpoint_url, self.timeout_s = region, endpoint_url, timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _ses(self) -> Any:
        with self._lock:
            if self._client is None:
                session = boto3.session.Session()
                region = self.region or session.region_name or DEFAULT_REGION
                config = Config(connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                                retries={"mode": "standard", "max_attempts": 2})
                self._client = session.client("ses", region_name=region, endpoint_url=self.endpoint_url,
                                              config=config)
            return self._client

    async def verify(self, domain: str) -> SesVerification:
        return await self._call(self._verify, domain)

    async def status(self, domain: str) -> SesStatus:
        return await self._call(self._status, domain)

    def _verify(self, domain: str) -> SesVerification:
        ses = self._ses()
        token = ses.verify_domain_identity(Domain=domain).get("VerificationToken")
        dkim = ses.verify_domain_dkim(Domain=domain).get("DkimTokens") or []
        if not (isinstance(token, str) and _TXT_TOKEN.match(token)) or not dkim or not all(
                isinstance(t, str) and _DKIM_TOKEN.match(t) for t in dkim):
            raise SesUnavailable(502, "Amazon SES returned unusable verification tokens")
        return SesVerification(token, list(dkim))

    def _status(self, domain: str) -> SesStatus:
        ses = self._ses()
        ident = ses.get_identity_verification_attributes(Identities=[domain]).get("VerificationAttributes") or {}
        dkim = ses.get_identity_dkim_attributes(Identities=[domain]).get("DkimAttributes") or {}
        return SesStatus(map_status((ident.get(domain) or {}).get("VerificationStatus")),
                         map_status((dkim.get(domain) or {}).get("DkimVerificationStatus")))

    async def _call(self, fn: Any, domain: str) -> Any:
        try:
            # the boto3 timeouts bound each attempt; this bounds the whole call, retries included
            return await asyncio.wait_for(asyncio.to_thread(fn, domain), self.timeout_s * 3 + 5)
        except SesUnavailable:
            raise
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "unknown")
            log.warning("SES %s for %s answered error code %s", fn.__name__.lstrip("_"), domain, code)
            if code in _RETRYABLE:
                raise SesUnavailable(503, "Amazon SES is busy; try again later") from None
            raise SesUnavailable(502, "Amazon SES refused the request") from None
        except (BotoCoreError, TimeoutError, OSError) as exc:  # unreachable, timeouts, no credentials/region
            log.warning("SES %s for %s failed: %s", fn.__name__.lstrip("_"), domain, type(exc).__name__)
            raise SesUnavailable(503, "Amazon SES is unavailable; try again later") from None


@lru_cache(maxsize=4)
def backend_for(region: str | None, endpoint_url: str | None, timeout_s: float) -> SesBackend:
    return SesBackend(region, endpoint_url, timeout_s)
