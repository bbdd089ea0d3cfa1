"""``POST /webhooks/ses``: Amazon SES bounce and complaint notifications delivered by SNS.

Unauthenticated by design, so every message passes, in this order (each refusal is a stable JSON
error, counted in ``postbus_ses_feedback_refused_total{reason}``):

1. its ``TopicArn`` is one of ``POSTBUS_SNS_TOPIC_ARNS`` (403 ``sns_topic_not_allowed``; with no
   topic configured every message is refused and a warning says POSTBUS_SNS_TOPIC_ARNS is unset);
2. a valid SNS signature (services/common/sns.py; 403 ``invalid_signature``);
3. a signed ``Timestamp`` at most ``POSTBUS_SNS_MAX_AGE_S`` old (default 1 h) and at most
   ``POSTBUS_SNS_CLOCK_SKEW_S`` ahead (403 ``sns_message_stale``);
4. a ``MessageId`` this process has not handled within that window (409 ``sns_message_replayed``;
   a failed attempt releases it so SNS's retry is accepted; per process, see ``ReplayCache``).

A ``SubscriptionConfirmation`` of a listed topic is confirmed by fetching its SubscribeURL (SNS
hosts only); one of any other topic is refused at step 1 and never fetched.

A ``Notification`` whose SES message is a Bounce or Complaint is attributed to the message Postbus
sent, resolved through the metrics service's message projection (``/internal/inbound/resolve``, as
the inbound listener does): by the original headers SES returns (``X-Postbus-Tenant`` +
``X-Postbus-Message-Id``, the first values, which are the ones Postbus wrote), else by the original
``Message-ID`` when it is Postbus's generated ``<pk@domain>`` (and then the headers, if any, must
name the same tenant and id). The tenant is the resolved message's, never the notification's
headers or From domain alone; an unresolved notification is acknowledged (200, ``ignored``) and
records nothing. Only envelope recipients of that message become ``feedback.bounce`` /
``feedback.complaint`` commands (the sender turns them into delivery events; hard bounces and
complaints put the recipient on the tenant's suppression list); any other listed address is
refused (``refused`` in the answer), logged without the address and counted. Permanent bounces and
complaints also append a ``domain.feedback`` command for the message's From domain, when it is one of
the same tenant's outbound domains, so its bounce/complaint counts and rates move. Other
notification types are acknowledged and ignored."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import httpx
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from prometheus_client import Counter
from pydantic import BaseModel, Field

from services.api.commands import Actor
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import ErrorOut
from services.api.state import ApiState
from services.common.feedback import NOT_A_RECIPIENT, attribute
from services.common.sns import ReplayCache, SnsError, StaleMessage, Verifier, allowed_topics, check_timestamp

log = logging.getLogger("postbus.api.webhooks")
router = APIRouter(tags=["webhooks"])

MAX_BODY = 256 * 1024
ACTOR = Actor("support", None, "ses-webhook")
TENANT_HEADER, CORRELATION_HEADER = "X-Postbus-Tenant", "X-Postbus-Message-Id"  # written by sender/mime.py
LOOKUP_TRIES = 6  # while the metrics projection lags the log: a feedback can overtake its message's ingest
LOOKUP_PAUSE_S = 0.5
UNSET_LOG_INTERVAL_S = 60.0

REFUSED = Counter("postbus_ses_feedback_refused_total",
                  "SES/SNS webhook messages refused (topic, signature, stale, replayed, uncorrelated) and "
                  "feedback recipients not attributed (not a recipient of the message)", ["reason"])
_unset_logged_at: float | None = None


class WebhookOut(BaseModel):
    ok: bool = True
    type: str = Field(..., description="the SNS message Type")
    confirmed: bool = Field(False, description="SubscriptionConfirmation: the subscription was confirmed")
    notification: str | None = Field(None, description="Bounce | Complaint | ... (Notification)")
    events: int = Field(0, description="bounce/complaint events recorded")
    ignored: str | None = Field(None, description="why a notification was not recorded (e.g. uncorrelated)")
    refused: int = Field(0, description="listed recipients that are not recipients of the message (not recorded)")


def _verifier(request: Request) -> Verifier:
    v = getattr(request.app.state, "postbus_sns", None)
    if v is None:
        s = state_of(request).settings
        v = Verifier(s.sns_cert_host_pattern, s.sns_ca_file)
        request.app.state.postbus_sns = v
    return v  # type: ignore[no-any-return]


def _header(mail: dict[str, Any], name: str) -> str | None:
    for h in mail.get("headers") or []:
        if isinstance(h, dict) and str(h.get("name", "")).lower() == name.lower():
            value = h.get("value")
            return str(value) if value is not None else None
    return None


def _replay_cache(request: Request) -> ReplayCache:
    cache = getattr(request.app.state, "postbus_sns_replay", None)
    if cache is None:
        s = state_of(request).settings
        cache = ReplayCache(s.sns_max_age_s, s.sns_clock_skew_s, s.sns_replay_cache_size)
        request.app.state.postbus_sns_replay = cache
    return cache  # type: ignore[no-any-return]


def _pk_of(rfc_message_id: Any) -> str | None:
    """The pk of Postbus's generated ``<pk@domain>`` Message-ID (anything else resolves to nothing)."""
    if not isinstance(rfc_message_id, str) or not rfc_message_id.strip():
        return None
    local = rfc_message_id.strip().strip("<>").rpartition("@")[0]
    return local or None


def _refuse(reason: str, status: int, code: str, message: str) -> ApiError:
    REFUSED.labels(reason).inc()
    return ApiError(status, code, message)


def feedback(ses: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """(kind, per-recipient fields) of a Bounce/Complaint SES message; None for other types."""
    ntype = ses.get("notificationType") or ses.get("eventType")
    if ntype == "Bounce":
        b = ses.get("bounce") or {}
        hard = b.get("bounceType") == "Permanent"
        return "bounce", [{"recipient": str(r.get("emailAddress", "")).lower(),
                           "bounce_type": "hard" if hard else "soft",
                           "bounce_code": (str(r["status"])[:32] if r.get("status") else None),
                           "bounce_reason": (str(r.get("diagnosticCode") or b.get("bounceSubType") or "")[:500]
                                             or None)}
                          for r in b.get("bouncedRecipients") or [] if isinstance(r, dict)]
    if ntype == "Complaint":
        c = ses.get("complaint") or {}
        return "complaint", [{"recipient": str(r.get("emailAddress", "")).lower(),
                              "feedback_type": str(c.get("complaintFeedbackType") or "abuse")[:64]}
                             for r in c.get("complainedRecipients") or [] if isinstance(r, dict)]
    return None


@router.post("/webhooks/ses", response_model=WebhookOut,
             summary="Amazon SNS endpoint for SES bounces and complaints (SNS-signed, listed topics only, no token)",
             responses={400: {"model": ErrorOut, "description": "invalid_json / not_sns: not an SNS message"},
                        403: {"model": ErrorOut,
                              "description": "sns_topic_not_allowed / invalid_signature / sns_message_stale"},
                        409: {"model": ErrorOut, "description": "sns_message_replayed: MessageId already handled"},
                        502: {"model": ErrorOut, "description": "subscription_not_confirmed"},
                        503: {"model": ErrorOut, "description": "log_unavailable / metrics_unavailable"}})
async def ses_webhook(request: Request) -> WebhookOut:
    st = state_of(request)
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(400, "invalid_json", "body too large")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", "the body is not JSON") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("Type"), str):
        raise ApiError(400, "not_sns", "not an SNS message")
    # 1. the topic, before anything is fetched for the message
    allowed = allowed_topics(st.settings.sns_topic_arns)
    if not allowed:
        _log_unset()
        raise _refuse("topics_unset", 403, "sns_topic_not_allowed",
                      "no SNS topic is configured for SES feedback (POSTBUS_SNS_TOPIC_ARNS is unset)")
    topic = msg.get("TopicArn")
    if not isinstance(topic, str) or topic not in allowed:
        log.warning("SNS message of an unlisted topic refused", extra={"topic": str(topic)[:256],
                                                                       "type": msg["Type"][:64]})
        raise _refuse("topic_not_allowed", 403, "sns_topic_not_allowed",
                      "messages from that SNS topic are not accepted")
    # 2. the signature
    verifier = _verifier(request)
    try:
        await verifier.verify(msg)
    except SnsError as exc:
        log.warning("SNS message refused", extra={"reason": str(exc)})
        raise _refuse("invalid_signature", 403, "invalid_signature", f"not a valid SNS message: {exc}") from exc
    # 3. freshness of the signed Timestamp
    try:
        ts = check_timestamp(msg, st.settings.sns_max_age_s, st.settings.sns_clock_skew_s)
    except StaleMessage as exc:
        log.warning("stale SNS message refused", extra={"reason": str(exc), "topic": topic})
        raise _refuse("stale", 403, "sns_message_stale", f"SNS message refused: {exc}") from exc
    # 4. replays of a MessageId within that window
    cache = _replay_cache(request)
    replay_key = f"{topic}\x1f{msg.get('MessageId')}"
    if not cache.reserve(replay_key, ts):
        log.warning("replayed SNS message refused", extra={"topic": topic, "sns_message_id": msg.get("MessageId")})
        raise _refuse("replayed", 409, "sns_message_replayed", "this SNS MessageId was already handled")
    try:
        return await _handle(request, msg)
    except BaseException:
        cache.release(replay_key)  # nothing was recorded: SNS's retry of the same message is welcome
        raise


def _log_unset() -> None:
    global _unset_logged_at
    now = time.monotonic()
    if _unset_logged_at is None or now - _unset_logged_at >= UNSET_LOG_INTERVAL_S:
        _unset_logged_at = now
        log.warning("POSTBUS_SNS_TOPIC_ARNS is unset: every SES/SNS message to POST /webhooks/ses is refused; "
                    "list the SNS topic ARNs of your SES notifications to accept them")


async def _handle(request: Request, msg: dict[str, Any]) -> WebhookOut:
    mtype = msg["Type"]
    if mtype == "SubscriptionConfirmation":
        try:
            await _verifier(request).confirm(msg)
        except SnsError as exc:
            raise ApiError(502, "subscription_not_confirmed", str(exc)) from exc
        log.info("SNS subscription confirmed", extra={"topic": msg.get("TopicArn")})
        return WebhookOut(type=mtype, confirmed=True)
    if mtype != "Notification":
        return WebhookOut(type=mtype)
    try:
        ses = json.loads(msg.get("Message") or "")
    except ValueError:
        ses = None
    if not isinstance(ses, dict):
        return WebhookOut(type=mtype, ignored="not an SES notification")
    parsed = feedback(ses)
    ntype = str(ses.get("notificationType") or ses.get("eventType") or "")[:64] or None
    if parsed is None:
        return WebhookOut(type=mtype, notification=ntype, ignored="not a bounce or complaint")
    kind, recipients = parsed
    return await _record(request, mtype, ntype, kind, recipients, ses.get("mail") or {})


async def _lookup_once(st: ApiState, params: dict[str, str]) -> dict[str, Any] | None:
    try:
        r = await st.metrics.get("/internal/inbound/resolve", params=params)
    except httpx.HTTPError as exc:
        raise ApiError(503, "metrics_unavailable", "the message projection cannot be read; SNS will retry") from exc
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise ApiError(503, "metrics_unavailable", "the message projection cannot be read; SNS will retry")
    found = r.json()
    return found if isinstance(found, dict) else None


async def _caught_up(st: ApiState) -> bool:
    try:
        return bool((await st.metrics.get("/internal/ingest-status")).json().get("caught_up"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


async def correlate(st: ApiState, mail: dict[str, Any]) -> dict[str, Any] | None:
    """The message Postbus sent that the SES ``mail`` object is about (the metrics projection's
    answer, with its ``recipients``), or None. Unknown while the projection lags the log: asked again
    for a few seconds, then 503 (SNS retries)."""
    tenant_h, mid_h = _header(mail, TENANT_HEADER), _header(mail, CORRELATION_HEADER)
    common = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    pk = _pk_of(common.get("messageId") or _header(mail, "Message-ID"))
    candidates: list[dict[str, str]] = []
    if tenant_h and mid_h:
        candidates.append({"tenant_id": tenant_h, "id": mid_h})
    if pk:
        candidates.append({"pk": pk})
    if not candidates:
        return None
    for attempt in range(LOOKUP_TRIES):
        for params in candidates:
            found = await _lookup_once(st, params)
            if found is None:
                continue
            if "pk" in params and ((tenant_h and found.get("tenant_id") != tenant_h)
                                   or (mid_h and found.get("id") != mid_h)):
                return None  # the Postbus headers and the Message-ID disagree: trust neither
            return found
        if attempt + 1 < LOOKUP_TRIES:
            if await _caught_up(st):
                return None
            await asyncio.sleep(LOOKUP_PAUSE_S)
    if await _caught_up(st):
        return None
    raise ApiError(503, "metrics_unavailable", "the message projection is behind the log; SNS will retry")


async def _record(request: Request, mtype: str, ntype: str | None, kind: str, recipients: list[dict[str, Any]],
                  mail: dict[str, Any]) -> WebhookOut:
    st = state_of(request)
    mail = mail if isinstance(mail, dict) else {}
    found = await correlate(st, mail)
    tenant_id = str((found or {}).get("tenant_id") or "")
    if found is None or not tenant_id or st.tenants.get(tenant_id) is None:
        REFUSED.labels("uncorrelated").inc()
        log.info("SES feedback about no message Postbus sent: ignored",
                 extra={"notification": ntype, "ses_message_id": str(mail.get("messageId"))[:128]})
        return WebhookOut(type=mtype, notification=ntype, ignored="uncorrelated: no message Postbus sent")
    message_id = str(found["id"])
    domain = (str(found.get("from_addr") or "").rpartition("@")[2].rstrip(">").strip().lower()) or None
    known = found.get("recipients") if isinstance(found.get("recipients"), list) else None
    now = int(time.time() * 1000)
    items = []
    accepted: list[dict[str, Any]] = []
    refused: dict[str, int] = {}
    for r in recipients:
        address, reason = (attribute(r["recipient"], known) if "@" in r["recipient"]
                           else (None, NOT_A_RECIPIENT))
        if address is None:
            refused[reason or NOT_A_RECIPIENT] = refused.get(reason or NOT_A_RECIPIENT, 0) + 1
            REFUSED.labels(reason or NOT_A_RECIPIENT).inc()
            continue
        r = {**r, "recipient": address}
        accepted.append(r)
        hit = {"kind": kind, "tenant_id": tenant_id, "message_id": message_id[:255],
               "account_id": found.get("account_id"), "url": None, "source": "ses", "ts": now,
               "sender_domain": domain, "bounce_type": None, "bounce_code": None, "bounce_reason": None,
               "feedback_type": None, **r}
        items.append((f"feedback.{kind}", tenant_id, ACTOR, "POST /webhooks/ses", "Engagement", hit))
    n_refused = sum(refused.values())
    if n_refused:
        # the addresses are not logged: they may be anyone's
        log.warning("SES feedback names addresses that are not recipients of the message: not recorded",
                    extra={"tenant_id": tenant_id, "message_id": message_id, "kind": kind, "refused": refused})
    events = len(items)
    if not items:
        return WebhookOut(type=mtype, notification=ntype, refused=n_refused,
                          ignored="no recipient of the message is named")
    counted = sum(1 for r in accepted if kind == "complaint" or r.get("bounce_type") == "hard")
    domains_rt = getattr(request.app.state, "postbus_domains", None)
    domain_rec = domains_rt.domains.get(domain) if (domains_rt is not None and domain) else None
    if counted and domain_rec is not None and domain_rec.get("tenant_id") == tenant_id:
        items.append(("domain.feedback", tenant_id, ACTOR, "POST /webhooks/ses", "DomainCommand", {
            "request_id": uuid.uuid4().hex, "name": domain, "tenant_id": tenant_id, "status": None,
            "daily_limit": None, "monthly_limit": None, "enforcement": None,
            "bounces": counted if kind == "bounce" else 0, "complaints": counted if kind == "complaint" else 0}))
    try:
        await st.writer.append_many(items)
    except KafkaError as exc:
        raise ApiError(503, "log_unavailable", "the event log did not take the write; SNS will retry") from exc
    return WebhookOut(type=mtype, notification=ntype, events=events, refused=n_refused)
