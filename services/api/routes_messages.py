"""add-messages: validate every message, append one command per tenant, answer queued/rejected."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.api.auth import authenticate, scope_tenant
from services.api.commands import Actor
from services.api.deps import state_of
from services.api.domain_runtime import FromDomainCheck
from services.api.errors import ApiError
from services.api.message_validation import (
    MAX_ID_LEN,
    MAX_MESSAGES_PER_CALL,
    Rejected,
    normalize_priority,
    validate_message,
)
from services.api.models import AddMessagesIn, AddMessagesOut
from services.api.projection import SENT_TOPICS, wait_for_tenant
from services.api.state import ApiState, account_key

log = logging.getLogger("postbus.api.messages")
router = APIRouter()

COMMAND_CHUNK = 200  # messages per command record: keeps records well under the broker's size limit


async def _already_sent(st: ApiState, tenant_id: str, ids: list[str]) -> set[str]:
    """Ids of this tenant that were already sent, from the metrics service's projection, once it has
    loaded every delivery event of the tenant written before this call (so an id whose sent report
    the client already has is always found). The sender's table is the authority and enforces the
    same rule: when the projection is unavailable or slower than ``projection_sent_check_wait_s``,
    or the id is being sent at this very moment, the message is accepted, the sender ignores the
    resubmission and the listing shows the original send (``status: sent``), never a pending one.

    First this process's own filter of sent events (``sent_filter.py``, caught up with the tenant's
    events as of this call) rules out the ids that were never sent, usually all of them: only the
    rest, if any, cost the metrics round trip and the projection wait."""
    wait_s = st.settings.projection_sent_check_wait_s
    if st.sent_filter is not None and wait_s > 0:
        maybe = await st.sent_filter.candidates(tenant_id, ids, timeout_s=min(wait_s, 1.0))
        if maybe is not None:
            if not maybe:
                return set()
            ids = maybe
    try:
        if st.settings.projection_sent_check_wait_s > 0:
            await wait_for_tenant(st, tenant_id, SENT_TOPICS, timeout_s=st.settings.projection_sent_check_wait_s)
        r = await st.metrics.post("/internal/sent-ids", json={"tenant_id": tenant_id, "ids": ids})
        r.raise_for_status()
        return set(r.json().get("sent", []))
    except Exception as exc:
        log.warning("sent-ids check unavailable; relying on the sender's guard", extra={"error": str(exc)})
        return set()


@router.post(
    "/commands/add-messages",
    tags=["commands"],
    response_model=AddMessagesOut,
    responses={400: {"description": "every message was rejected, or more than 1000 messages"}},
)
async def add_messages(body: AddMessagesIn, request: Request) -> Any:
    st = state_of(request)
    actor = authenticate(request, st)
    if len(body.messages) > MAX_MESSAGES_PER_CALL:
        raise ApiError(400, "too_many_messages",
                       f"{len(body.messages)} messages in one call; the limit is {MAX_MESSAGES_PER_CALL}")
    # a tenant key may only queue for its own tenant: a foreign tenant_id fails the whole call
    if actor.kind == "tenant":
        for raw in body.messages:
            if isinstance(raw, dict) and raw.get("tenant_id") not in (None, ""):
                scope_tenant(actor, raw.get("tenant_id"))
    default_priority = normalize_priority(body.default_priority)
    now_ms = int(time.time() * 1000)
    accepted: dict[tuple[str, str], dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    to_report: dict[str, list[dict[str, Any]]] = {}  # tenant -> rejected items reported as errors

    def reject(raw: Any, reason: str, report: bool = True, code: str | None = None) -> None:
        mid = raw.get("id") if isinstance(raw, dict) else None
        item = {"id": str(mid) if mid not in (None, "") else None, "reason": reason}
        if code:
            item["code"] = code  # a stable identifier beside the seed's human-readable reason
        rejected.append(item)
        tenant_id = _attributable_tenant(st, actor, raw) if report else None
        if tenant_id is not None:
            account = raw.get("account_id")
            to_report.setdefault(tenant_id, []).append(
                {"id": str(mid), "reason": reason, "account_id": account if isinstance(account, str) else None})

    from_domains = FromDomainCheck(getattr(request.app.state, "postbus_domains", None))
    for raw in body.messages:
        try:
            msg = validate_message(
                raw,
                default_priority=default_priority,
                account_exists=lambda t, a: st.accounts.get(account_key(t, a)) is not None,
                tenant_exists=lambda t: st.tenants.get(t) is not None,
                now_ms=now_ms,
                encrypt=st.box.encrypt,
            )
        except Rejected as exc:
            reject(raw, str(exc), code=exc.code)
            continue
        refusal = await from_domains.refusal(msg)  # sender_domain_not_owned / sender_domain_not_verified
        if refusal is not None:
            reject(raw, refusal)
            continue
        key = (msg["tenant_id"], msg["id"])
        if key in accepted:
            reject(raw, "duplicate id in this request", report=False)  # the first one is queued
            continue
        accepted[key] = msg

    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for (tenant_id, _), msg in accepted.items():
        by_tenant.setdefault(tenant_id, []).append(msg)
    for tenant_id, msgs in list(by_tenant.items()):
        sent = await _already_sent(st, tenant_id, [m["id"] for m in msgs])
        if sent:
            for m in msgs:
                if m["id"] in sent:
                    rejected.append({"id": m["id"], "reason": "already sent", "code": "already_sent"})
            by_tenant[tenant_id] = [m for m in msgs if m["id"] not in sent]

    queued = sum(len(m) for m in by_tenant.values())
    await _append_rejections(st, actor, to_report)
    # genro 0.6: a batch refused only as "already sent" is an idempotent retry (200, queued 0)
    if body.messages and queued == 0 and not all(r.get("code") == "already_sent" for r in rejected):
        return JSONResponse(
            {"ok": False, "queued": 0, "rejected": rejected,
             "error": {"code": "all_rejected", "message": "every message was rejected"},
             "detail": {"rejected": rejected}},  # where genro 0.6 clients read the reasons
            status_code=400,
        )
    await _append(st, actor, by_tenant)
    # as built: "code" only on the items that have one (the seed's items are {id, reason})
    return JSONResponse({"ok": True, "queued": queued, "rejected": rejected})


async def _append(st: ApiState, actor: Actor, by_tenant: dict[str, list[dict[str, Any]]]) -> None:
    items = []
    for tenant_id, msgs in by_tenant.items():
        for i in range(0, len(msgs), COMMAND_CHUNK):
            items.append(("messages.add", tenant_id, actor, "POST /commands/add-messages", "AddMessages",
                          {"messages": msgs[i:i + COMMAND_CHUNK]}))
    if items:
        await st.writer.append_many(items)


def _attributable_tenant(st: ApiState, actor: Actor, raw: Any) -> str | None:
    """The tenant a rejected message can be reported to: a tenant key's own tenant, or (admin) the
    message's tenant_id when that tenant exists. None when the id is not a usable message id."""
    if not isinstance(raw, dict):
        return None
    mid = raw.get("id")
    if isinstance(mid, bool) or not isinstance(mid, str | int) or mid == "":
        return None
    mid = str(mid)
    if len(mid) > MAX_ID_LEN or any(c in mid for c in "\r\n\x00\x1f"):
        return None
    if actor.kind == "tenant":
        return actor.tenant_id
    tenant_id = raw.get("tenant_id")
    if isinstance(tenant_id, str) and st.tenants.get(tenant_id) is not None:
        return tenant_id
    return None


async def _append_rejections(st: ApiState, actor: Actor, to_report: dict[str, list[dict[str, Any]]]) -> None:
    """One messages.reject command per tenant: the sender turns each item into a "rejected" event,
    which the reporter delivers to the tenant as an error."""
    items = [("messages.reject", tenant_id, actor, "POST /commands/add-messages", "RejectMessages",
              {"tenant_id": tenant_id, "items": rejections[i:i + COMMAND_CHUNK]})
             for tenant_id, rejections in to_report.items() for i in range(0, len(rejections), COMMAND_CHUNK)]
    if items:
        await st.writer.append_many(items)
