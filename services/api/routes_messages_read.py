"""GET /messages and GET /tenants/sync-status: reads served by projections.

Messages come from the metrics service's message projection (ClickHouse: submissions from the
command topic, delivery events, report acknowledgements), read only once the projection has loaded
the tenant's partitions up to their end offsets at request time (``projection.py``: a client sees
its own writes, 503 ``projection_unavailable`` otherwise); sync status from the reporter's compacted
``postbus.status.sync`` records joined with the tenants view."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.api.auth import authenticate, require_admin, scope_tenant
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.projection import ALL_TOPICS, ProjectionUnavailable, wait_for_tenant

log = logging.getLogger("postbus.api.messages_read")
router = APIRouter()

MAX_LIST = 100_000


class MessageEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="sent | error | deferred | rejected | deleted | ...")
    ts: float | None = Field(None, description="unix seconds of the event")
    error: str | None = None
    smtp_code: int | None = None
    deferred_until: float | None = None
    deferred_reason: str | None = None
    attempt: int | None = None
    event_id: str | None = None
    reported_ts: float | None = Field(None, description="when the client acknowledged this event's report")


class MessageOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    pk: str | None = Field(None, description="internal UUID of the current submission")
    id: str = Field(description="client-provided message id")
    tenant_id: str
    tenant_name: str | None = None
    account_id: str | None = None
    priority: int | None = None
    batch_code: str | None = None
    deferred_ts: float | None = None
    sent_ts: float | None = None
    smtp_ts: float | None = Field(None, description="same as sent_ts (the seed's name)")
    error_ts: float | None = None
    error: str | None = None
    reported_ts: float | None = Field(None, description="last acknowledgement of a report of this message")
    status: str = Field(description="pending | deferred | sent | error | rejected")
    subject: str | None = None
    accepted_ts: float | None = None
    payload: dict[str, Any] | None = Field(None, description="submission summary: from, to, subject, ...")
    history: list[MessageEvent] | None = Field(None, description="only with include_history=true, in event order")


class MessagesOut(BaseModel):
    ok: bool = True
    messages: list[MessageOut]
    total: int = Field(description="messages matching the filter (before limit/offset)")


class SyncTenant(BaseModel):
    id: str
    name: str | None
    active: bool
    client_base_url: str | None
    last_sync_ts: int | None = Field(description="last sync call (unix s), or the DND end when in DND")
    next_sync_due: bool
    in_dnd: bool


class SyncStatusOut(BaseModel):
    ok: bool = True
    sync_interval_seconds: int
    tenants: list[SyncTenant]


def _unavailable() -> ApiError:
    return ProjectionUnavailable("the message projection (metrics service) is not reachable; retry later")


@router.get(
    "/messages",
    tags=["messages"],
    summary="List a tenant's messages with lifecycle fields (and event history)",
    response_model=MessagesOut,
    responses={
        400: {"description": "admin call without tenant_id"},
        401: {"description": "missing/invalid token, or another tenant's id (tenant_mismatch)"},
        503: {"description": "projection_unavailable: the message projection is down, replaying, or did not "
                             "reach the tenant's latest writes within projection_wait_timeout_s"},
    },
)
async def list_messages(
    request: Request,
    tenant_id: str | None = Query(None, description="required with the admin token; a tenant key defaults to its own"),
    active_only: bool = Query(False, description="only messages not in a final state (pending, deferred)"),
    include_history: bool = Query(False, description="add every event of each message, in order"),
    limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST),
    offset: int = Query(0, ge=0),
) -> Any:
    st = state_of(request)
    actor = authenticate(request, st)
    tid = scope_tenant(actor, tenant_id or None)
    if not tid:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    await wait_for_tenant(st, tid, ALL_TOPICS)  # read-your-writes
    try:
        r = await st.metrics.get("/internal/messages", params={
            "tenant_id": tid, "active_only": str(active_only).lower(),
            "include_history": str(include_history).lower(), "limit": limit, "offset": offset})
        r.raise_for_status()
        body = r.json()
    except Exception as exc:
        log.warning("message projection unavailable", extra={"error": repr(exc)})
        raise _unavailable() from exc
    tenant = st.tenants.get(tid) or {}
    messages = body.get("messages", [])
    for m in messages:
        m["tenant_name"] = tenant.get("name")
    # returned as is: the fields a message lacks stay null, and "history" only when asked for
    return JSONResponse({"ok": True, "messages": messages, "total": body.get("total", len(messages))})


@router.get(
    "/tenants/sync-status",
    tags=["tenants"],
    summary="Sync status of every tenant (admin)",
    response_model=SyncStatusOut,
    responses={401: {"description": "missing/invalid token"}, 403: {"description": "not the admin token"}},
)
async def sync_status(request: Request) -> SyncStatusOut:
    st = state_of(request)
    require_admin(authenticate(request, st))
    stored = st.instance.get("instance") if st.instance is not None else None
    interval = float((stored or {}).get("sync_interval_seconds") or st.settings.reporter_sync_interval_s)
    now = time.time()
    rows = []
    for tid, tenant in sorted(st.tenants.items.items()):
        rec = st.sync_status.get(tid) if st.sync_status is not None else None
        last = float((rec or {}).get("last_sync_ts") or 0.0)
        dnd = float((rec or {}).get("dnd_until") or 0.0)
        in_dnd = now < dnd
        shown = max(last, dnd)  # the seed: a future last_sync_ts while in DND
        rows.append(SyncTenant(
            id=tid,
            name=tenant.get("name"),
            active=bool(tenant.get("active", True)),
            client_base_url=tenant.get("client_base_url"),
            last_sync_ts=int(shown) if shown else None,
            next_sync_due=not in_dnd and now >= last + interval,
            in_dnd=in_dnd,
        ))
    return SyncStatusOut(sync_interval_seconds=int(interval), tenants=rows)
