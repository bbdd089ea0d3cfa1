"""``POST /webhooks/ses``: Amazon SES bounce and complaint notifications delivered by SNS.

Unauthenticated by design: every message must carry a valid SNS signature (services/common/sns.py),
else 403. A ``SubscriptionConfirmation`` is confirmed by fetching its SubscribeURL (SNS hosts only).
A ``Notification`` whose SES message is a Bounce or Complaint is correlated with the Postbus message
through the original headers SES returns (``X-Postbus-Tenant``, ``X-Postbus-Message-Id``: the first
value, which is the one Postbus wrote) and becomes, per recipient, a ``feedback.bounce`` /
``feedback.complaint`` command (the sender turns them into delivery events; hard bounces and
complaints put the recipient on the tenant's suppression list). Permanent bounces and complaints
also append a ``domain.feedback`` command for the sending domain, when it is one of the tenant's
outbound domains, so its bounce/complaint counts and rates move. Other notification types are
acknowledged and ignored."""

from __future__ import annotations

import json
import logging
import time
import uuid
from email.utils import getaddresses
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.api.commands import Actor
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import ErrorOut
from services.common.sns import SnsError, Verifier

log = logging.getLogger("postbus.api.webhooks")
router = APIRouter(tags=["webhooks"])

MAX_BODY = 256 * 1024
ACTOR = Actor("support", None, "ses-webhook")


class WebhookOut(BaseModel):
    ok: bool = True
    type: str = Field(..., description="the SNS message Type")
    confirmed: bool = Field(False, description="SubscriptionConfirmation: the subscription was confirmed")
    notification: str | None = Field(None, description="Bounce | Complaint | ... (Notification)")
    events: int = Field(0, description="bounce/complaint events recorded")
    ignored: str | None = Field(None, description="why a notification was not recorded (e.g. uncorrelated)")


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


def _domain(mail: dict[str, Any]) -> str | None:
    common = mail.get("commonHeaders") or {}
    candidates = list(common.get("from") or []) if isinstance(common.get("from"), list) else []
    candidates.append(str(mail.get("source") or ""))
    for raw in candidates:
        addrs = [a for _, a in getaddresses([str(raw)]) if "@" in a]
        if addrs:
            return addrs[0].rpartition("@")[2].lower()
    return None


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
             summary="Amazon SNS endpoint for SES bounces and complaints (SNS-signed, no token)",
             responses={400: {"model": ErrorOut, "description": "invalid_json / not_sns: not an SNS message"},
                        403: {"model": ErrorOut, "description": "invalid_signature / topic_not_allowed"},
                        502: {"model": ErrorOut, "description": "subscription_not_confirmed"},
                        503: {"model": ErrorOut, "description": "log_unavailable"}})
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
    allowed = [a.strip() for a in st.settings.sns_topic_arns.split(",") if a.strip()]
    if allowed and msg.get("TopicArn") not in allowed:
        raise ApiError(403, "topic_not_allowed", "notifications from that topic are not accepted")
    verifier = _verifier(request)
    try:
        await verifier.verify(msg)
    except SnsError as exc:
        log.warning("SNS message refused", extra={"reason": str(exc)})
        raise ApiError(403, "invalid_signature", f"not a valid SNS message: {exc}") from exc
    mtype = msg["Type"]
    if mtype == "SubscriptionConfirmation":
        try:
            await verifier.confirm(msg)
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


async def _record(request: Request, mtype: str, ntype: str | None, kind: str, recipients: list[dict[str, Any]],
                  mail: dict[str, Any]) -> WebhookOut:
    st = state_of(request)
    mail = mail if isinstance(mail, dict) else {}
    domain = _domain(mail)
    domains_rt = getattr(request.app.state, "postbus_domains", None)
    domain_rec = domains_rt.domains.get(domain) if (domains_rt is not None and domain) else None
    tenant_id = _header(mail, "X-Postbus-Tenant") or (domain_rec or {}).get("tenant_id")
    message_id = _header(mail, "X-Postbus-Message-Id") or (mail.get("commonHeaders") or {}).get("messageId")
    if not tenant_id or st.tenants.get(tenant_id) is None or not message_id:
        return WebhookOut(type=mtype, notification=ntype, ignored="uncorrelated: no Postbus tenant/message")
    now = int(time.time() * 1000)
    items = []
    for r in recipients:
        if "@" not in r["recipient"]:
            continue
        hit = {"kind": kind, "tenant_id": tenant_id, "message_id": str(message_id)[:255], "account_id": None,
               "url": None, "source": "ses", "ts": now, "sender_domain": domain, "bounce_type": None,
               "bounce_code": None, "bounce_reason": None, "feedback_type": None, **r}
        items.append((f"feedback.{kind}", tenant_id, ACTOR, "POST /webhooks/ses", "Engagement", hit))
    events = len(items)
    counted = sum(1 for r in recipients if kind == "complaint" or r.get("bounce_type") == "hard")
    if counted and domain_rec is not None and domain_rec.get("tenant_id") == tenant_id:
        items.append(("domain.feedback", tenant_id, ACTOR, "POST /webhooks/ses", "DomainCommand", {
            "request_id": uuid.uuid4().hex, "name": domain, "tenant_id": tenant_id, "status": None,
            "daily_limit": None, "monthly_limit": None, "enforcement": None,
            "bounces": counted if kind == "bounce" else 0, "complaints": counted if kind == "complaint" else 0}))
    try:
        await st.writer.append_many(items)
    except KafkaError as exc:
        raise ApiError(503, "log_unavailable", "the event log did not take the write; SNS will retry") from exc
    return WebhookOut(type=mtype, notification=ntype, events=events)
