"""Amazon SNS message signature verification (SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA).

The signing certificate is fetched from ``SigningCertURL`` only if that URL is https on a host the
configured pattern allows (default: ``sns.<region>.amazonaws.com``), and cached per URL. The same
rule guards ``SubscribeURL`` before a subscription is confirmed. Tests configure the host pattern
and a CA bundle (``POSTBUS_SNS_CERT_HOST_PATTERN``, ``POSTBUS_SNS_CA_FILE``).

A valid signature only proves that *some* AWS account's topic sent the message. The caller also
checks (services/api/routes_webhooks.py): the ``TopicArn`` against the operator's list
(:func:`allowed_topics`; none configured = nothing accepted), the signed ``Timestamp`` against a
maximum age and clock skew (:func:`check_timestamp`), and the ``MessageId`` against a
:class:`ReplayCache` of the ids seen within that window."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import ssl
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
MAX_CERT_BYTES = 64 * 1024
CACHE_SIZE = 64


class SnsError(Exception):
    """The message is not a genuine SNS message (or its certificate cannot be had)."""


class StaleMessage(SnsError):
    """The message's signed Timestamp is missing, too old or too far in the future."""


def allowed_topics(setting: str) -> frozenset[str]:
    """The topic ARNs of ``POSTBUS_SNS_TOPIC_ARNS`` (comma-separated); empty = no topic is accepted."""
    return frozenset(a.strip() for a in (setting or "").split(",") if a.strip())


def parse_timestamp(value: Any) -> float:
    """SNS ``Timestamp`` (ISO 8601, ``2024-01-01T10:00:00.000Z``) -> POSIX seconds."""
    if not isinstance(value, str) or not value or len(value) > 64:
        raise StaleMessage("Timestamp missing")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise StaleMessage("Timestamp is not ISO 8601") from exc
    if ts.tzinfo is None:
        raise StaleMessage("Timestamp has no time zone")
    return ts.timestamp()


def check_timestamp(msg: dict[str, Any], max_age_s: float, skew_s: float, now: float | None = None) -> float:
    """The message's Timestamp (POSIX seconds) if it is at most ``max_age_s`` old and at most
    ``skew_s`` ahead of ``now``; else :class:`StaleMessage`. (SNS retries a failed delivery with the
    original Timestamp, so ``max_age_s`` must exceed the topic's retry period.)"""
    ts = parse_timestamp(msg.get("Timestamp"))
    now = time.time() if now is None else now
    if ts < now - max_age_s:
        raise StaleMessage(f"Timestamp is older than {int(max_age_s)} s")
    if ts > now + skew_s:
        raise StaleMessage("Timestamp is in the future")
    return ts


class ReplayCache:
    """The SNS MessageIds seen by this process within the Timestamp window, bounded.

    ``reserve`` claims an id (False: seen before, or being handled right now); ``release`` gives it
    back when handling failed, so SNS's own retry of the same message is accepted. An id is kept until
    its Timestamp leaves the window (after that the Timestamp check refuses it anyway). Beyond
    ``max_entries`` the ids closest to expiry are dropped first, and ``overflowed`` counts them.

    Per process: several API processes each keep their own ids, so a replay that reaches another
    process within the window is not recognised here. Such a replay can only repeat the feedback of
    the same recipients of the same message (their suppression is idempotent and the analytics
    count a message once), but the outbound domain's bounce/complaint counters and the tenant's
    reports would see it again: route SNS to one API process when that matters."""

    def __init__(self, max_age_s: float, skew_s: float, max_entries: int = 200_000) -> None:
        self.window_s = max_age_s + skew_s
        self.max_entries = max_entries
        self.overflowed = 0
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> expiry (POSIX seconds)

    def __len__(self) -> int:
        return len(self._ids)

    def _expire(self, now: float) -> None:
        # insertion order is nearly expiry order (Timestamps arrive roughly in order): stop at the first
        # live entry; a late one is dropped on a later call
        while self._ids:
            key, expiry = next(iter(self._ids.items()))
            if expiry > now:
                break
            del self._ids[key]

    def reserve(self, message_id: str, timestamp: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        self._expire(now)
        expiry = self._ids.get(message_id)
        if expiry is not None and expiry > now:
            return False
        self._ids[message_id] = timestamp + self.window_s
        self._ids.move_to_end(message_id)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)
            self.overflowed += 1
        return True

    def release(self, message_id: str) -> None:
        self._ids.pop(message_id, None)


def string_to_sign(msg: dict[str, Any]) -> bytes:
    keys = NOTIFICATION_KEYS if msg.get("Type") == "Notification" else CONFIRMATION_KEYS
    out = []
    for key in keys:
        if key == "Subject" and msg.get(key) is None:
            continue  # the only optional field
        value = msg.get(key)
        if not isinstance(value, str):
            raise SnsError(f"missing {key}")
        out.append(f"{key}\n{value}\n")
    return "".join(out).encode()


def check_url(url: Any, host_pattern: str) -> str:
    """The URL if it is https on an allowed host (the pattern is matched against ``host[:port]``)."""
    if not isinstance(url, str) or len(url) > 2048:
        raise SnsError("URL missing")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise SnsError("URL is not valid") from exc
    if parts.scheme != "https":
        raise SnsError("URL is not https")
    if "@" in parts.netloc or not parts.hostname:
        raise SnsError("URL host is not allowed")
    if not re.fullmatch(host_pattern, parts.netloc.lower()):
        raise SnsError("URL host is not an SNS host")
    return url


class Verifier:
    def __init__(self, host_pattern: str, ca_file: str | None = None, timeout_s: float = 10.0) -> None:
        self.host_pattern = host_pattern
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self._certs: dict[str, x509.Certificate] = {}
        self._lock = asyncio.Lock()

    def client(self) -> httpx.AsyncClient:
        """A client for certificate/SubscribeURL fetches (a missing CA file fails like an untrusted host)."""
        # the CA file is read per client: it may be provisioned after start-up
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        return httpx.AsyncClient(verify=verify, timeout=self.timeout_s, follow_redirects=False)

    async def certificate(self, url: str) -> x509.Certificate:
        check_url(url, self.host_pattern)
        if not urlsplit(url).path.endswith(".pem"):
            raise SnsError("SigningCertURL is not a .pem file")
        cert = self._certs.get(url)
        if cert is not None:
            return cert
        async with self._lock:
            if url in self._certs:
                return self._certs[url]
            try:
                async with self.client() as http:
                    r = await http.get(url)
            except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
                raise SnsError("signing certificate cannot be fetched") from exc
            if r.status_code != 200 or len(r.content) > MAX_CERT_BYTES:
                raise SnsError("signing certificate cannot be fetched")
            try:
                cert = x509.load_pem_x509_certificate(r.content)
            except ValueError as exc:
                raise SnsError("signing certificate is not a PEM certificate") from exc
            if len(self._certs) >= CACHE_SIZE:
                self._certs.pop(next(iter(self._certs)))
            self._certs[url] = cert
            return cert

    async def verify(self, msg: dict[str, Any]) -> None:
        """Raises :class:`SnsError` unless ``msg`` is signed by the certificate it names."""
        if msg.get("Type") not in TYPES:
            raise SnsError("unknown message Type")
        version = msg.get("SignatureVersion")
        algorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(str(version))
        if algorithm is None:
            raise SnsError("unsupported SignatureVersion")
        try:
            signature = base64.b64decode(str(msg.get("Signature") or ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SnsError("Signature is not base64") from exc
        data = string_to_sign(msg)
        cert = await self.certificate(msg.get("SigningCertURL"))  # type: ignore[arg-type]
        now = datetime.now(UTC)
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            raise SnsError("signing certificate is expired")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsError("signing certificate has no RSA key")
        try:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        except InvalidSignature as exc:
            raise SnsError("signature does not verify") from exc

    async def confirm(self, msg: dict[str, Any]) -> None:
        """Confirm a subscription: GET its SubscribeURL (same host rules as the certificate)."""
        url = check_url(msg.get("SubscribeURL"), self.host_pattern)
        try:
            async with self.client() as http:
                r = await http.get(url)
        except (httpx.HTTPError, OSError) as exc:
            raise SnsError("SubscribeURL did not answer") from exc
        if r.status_code != 200:
            raise SnsError(f"SubscribeURL answered {r.status_code}")
