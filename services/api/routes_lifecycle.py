"""Message lifecycle commands: suspend, activate, delete-messages, cleanup-messages.

suspend/activate write the tenant's new ``Suspension`` record on ``postbus.config.suspensions``
in one transaction with the command; the sender follows both. delete/cleanup ask the metrics
service's message projection which ids qualify, once it has loaded the tenant's partitions up to
their end offsets at request time (read-your-writes, ``projection.py``), and append one command the
sender applies."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, StringConstraints

from services.api.auth import authenticate, scope_tenant
from services.api.commands import Actor, ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.projection import ALL_TOPICS, STATE_TOPICS, ProjectionUnavailable, wait_for_tenant
from services.api.routes_admin import INSTANCE_KEY, instance_record
from services.api.state import ApiState
from services.common import suspension
from services.common.topics import CONFIG_INSTANCE, CONFIG_SUSPENSIONS

log = logging.getLogger("postbus.api.lifecycle")
router = APIRouter()

DEFAULT_RETENTION_S = 7 * 86400
IDS_PER_COMMAND = 2000  # keeps one command record far below the broker's message size limit
MAX_IDS = 10000

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "tenant_id missing (admin token) or invalid input"},
    401: {"description": "missing/invalid token, or tenant_mismatch"},
    404: {"description": "tenant_not_found"},
}


class SuspensionOut(BaseModel):
    ok: bool = True
    tenant_id: str | None = Field(..., description="null: the admin's instance-wide switch (no tenant_id)")
    batch_code: str | None = Field(None, description="the batch acted on; null = all batches")
    suspended_batches: list[str] = Field(..., description="batch codes currently held")
    suspended_all: bool = Field(..., description="true while every batch (and unbatched mail) is held")


class DeleteMessagesIn(BaseModel):
    ids: list[Annotated[str, StringConstraints(max_length=255)]] = Field(
        ..., max_length=MAX_IDS, description="the tenant's message ids")


class DeleteMessagesOut(BaseModel):
    ok: bool = True
    removed: int = Field(..., description="pending messages removed from the queue")
    not_found: list[str]
    unauthorized: list[str] = Field(..., description="ids that exist only under another tenant")


class CleanupMessagesIn(BaseModel):
    older_than_seconds: int | None = Field(
        None, ge=0, le=100 * 365 * 86400,
        description="default: the instance's report_retention_seconds (7 days when unset)")


class CleanupMessagesOut(BaseModel):
    ok: bool = True
    removed: int


def _tenant(request: Request, st: ApiState, tenant_id: str | None) -> tuple[Actor, str]:
    actor = authenticate(request, st)
    tid = scope_tenant(actor, tenant_id or None)
    if not tid:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    if st.tenants.get(tid) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tid!r} does not exist")
    return actor, tid


async def _change_suspension(request: Request, tenant_id: str | None, batch_code: str | None,
                             action: str) -> SuspensionOut:
    st = state_of(request)
    if not tenant_id and authenticate(request, st).kind == "admin":
        return await _toggle_scheduler(request, st, action)
    actor, tid = _tenant(request, st, tenant_id)
    batch_code = (batch_code or "").strip() or None  # empty = all, like omitted
    if batch_code is not None and len(batch_code) > 255:
        raise ApiError(400, "invalid_batch_code", "batch_code must be at most 255 characters (or * for all)")
    assert st.suspensions is not None
    views = st.suspensions
    out: dict[str, Any] = {}

    def build() -> ConfigWrite:  # re-run on a fresh view if another API instance wrote meanwhile
        now = int(time.time() * 1000)
        try:
            if action == "suspend":
                record = suspension.suspend(views.get(tid), tid, batch_code, now)
            else:
                record = suspension.activate(views.get(tid), tid, batch_code, now)
        except suspension.AllBatchesSuspended:
            raise ApiError(409, "all_batches_suspended",
                           f"all batches of tenant {tid!r} are suspended: activate all (no batch_code) "
                           f"before activating batch {batch_code!r}") from None
        out["record"] = record
        return ConfigWrite(f"messages.{action}", tid, actor, f"POST /commands/{action}", "Suspension", record,
                           [ConfigRecord(CONFIG_SUSPENSIONS, tid, "Suspension", record)])

    offsets = await st.writer.update_config(await st.writer.shard_of(tid), views.catch_up, build)
    await st.wait_visible(offsets)
    record = out["record"]
    return SuspensionOut(tenant_id=tid, batch_code=None if batch_code in (None, suspension.ALL) else batch_code,
                         # genro 0.6: "*" listed when everything is held
                         suspended_batches=([suspension.ALL] if record["all"] else []) + record["batches"],
                         suspended_all=record["all"])


async def _toggle_scheduler(request: Request, st: ApiState, action: str) -> SuspensionOut:
    """The seed's admin suspend/activate without a tenant "toggles the scheduler": the instance's
    ``active`` switch (as ``PUT /instance``), which the sender honours for every tenant."""
    actor = authenticate(request, st)
    assert st.instance is not None
    view = st.instance

    def build() -> ConfigWrite:
        rec = {**instance_record(st), "active": action == "activate", "updated_ts": int(time.time() * 1000)}
        return ConfigWrite("instance.update", None, actor, f"POST /commands/{action}", "Instance", rec,
                           [ConfigRecord(CONFIG_INSTANCE, INSTANCE_KEY, "Instance", rec)])

    offsets = await st.writer.update_config("instance", view.catch_up, build)
    await st.wait_visible(offsets)
    off = action == "suspend"
    return SuspensionOut(tenant_id=None, batch_code=None, suspended_batches=[suspension.ALL] if off else [],
                         suspended_all=off)


_BATCH = Query(None, description="the batch to act on; omitted or * = all batches")
_TENANT = Query(None, description="the tenant; a tenant key defaults to its own, the admin must give it")


@router.post("/commands/suspend", tags=["commands"], response_model=SuspensionOut, responses=_ERRORS,
             summary="Hold sending of one batch_code, or of all the tenant's mail")
async def suspend_route(request: Request, tenant_id: str | None = _TENANT,
                        batch_code: str | None = _BATCH) -> SuspensionOut:
    return await _change_suspension(request, tenant_id, batch_code, "suspend")


@router.post("/commands/activate", tags=["commands"], response_model=SuspensionOut,
             responses={**_ERRORS, 409: {"description": "all_batches_suspended: activate all first"}},
             summary="Release one suspended batch_code, or everything")
async def activate_route(request: Request, tenant_id: str | None = _TENANT,
                         batch_code: str | None = _BATCH) -> SuspensionOut:
    return await _change_suspension(request, tenant_id, batch_code, "activate")


async def _metrics_post(st: ApiState, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """POST to the metrics service; None when it does not serve that route (404)."""
    try:
        r = await st.metrics.post(path, json=body)
    except httpx.HTTPError as exc:
        log.warning("metrics service unreachable", extra={"path": path, "error": str(exc)})
        raise ProjectionUnavailable("the message projection is unavailable; retry later") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        log.warning("metrics service error", extra={"path": path, "status": r.status_code})
        raise ProjectionUnavailable("the message projection is unavailable; retry later")
    data = r.json()
    return data if isinstance(data, dict) else {}


async def _append_ids(st: ApiState, ctype: str, tid: str, actor: Actor, route: str, ids: list[str]) -> None:
    chunks = [ids[i:i + IDS_PER_COMMAND] for i in range(0, len(ids), IDS_PER_COMMAND)] or [[]]
    await st.writer.append_many([(ctype, tid, actor, route, "MessageIds", {"tenant_id": tid, "ids": chunk})
                                 for chunk in chunks])


_UNAVAILABLE = {503: {"description": "projection_unavailable: the message projection is down, replaying, or did "
                                     "not reach the tenant's latest writes within projection_wait_timeout_s; "
                                     "nothing was changed"}}


@router.post("/commands/delete-messages", tags=["commands"], response_model=DeleteMessagesOut,
             responses={**_ERRORS, **_UNAVAILABLE},
             summary="Remove pending messages from the queue by id")
async def delete_messages(body: DeleteMessagesIn, request: Request, tenant_id: str | None = _TENANT) -> Any:
    st = state_of(request)
    actor, tid = _tenant(request, st, tenant_id)
    ids = list(dict.fromkeys(body.ids))  # dedupe, keep order
    if not ids:
        return DeleteMessagesOut(removed=0, not_found=[], unauthorized=[])
    # read-your-writes: the projection has every submission, delete and outcome of the tenant
    # written before this request, so pending / final / unknown are exact as of now
    await wait_for_tenant(st, tid, STATE_TOPICS)
    found = await _metrics_post(st, "/internal/messages/lookup", {"tenant_id": tid, "ids": ids}) or {}
    pending = set(found.get("pending") or ())
    final = set(found.get("final") or ())
    others = set(found.get("other_tenants") or ()) - pending - final
    not_found = [i for i in ids if i not in pending and i not in final and i not in others]
    targets = [i for i in ids if i in pending]
    if targets:
        await _append_ids(st, "messages.delete", tid, actor, "POST /commands/delete-messages", targets)
    return DeleteMessagesOut(removed=len(targets), not_found=not_found,
                             unauthorized=[i for i in ids if i in others])


def _retention_s(st: ApiState) -> int:
    inst = st.instance.get("instance") if st.instance is not None else None
    value = inst.get("report_retention_seconds") if inst else None
    return int(value) if value is not None else DEFAULT_RETENTION_S


@router.post("/commands/cleanup-messages", tags=["commands"], response_model=CleanupMessagesOut,
             responses={**_ERRORS, **_UNAVAILABLE},
             summary="Remove fully reported messages older than the retention")
async def cleanup_messages(request: Request, body: CleanupMessagesIn | None = None,
                           tenant_id: str | None = _TENANT) -> Any:
    st = state_of(request)
    actor, tid = _tenant(request, st, tenant_id)
    older = body.older_than_seconds if body and body.older_than_seconds is not None else _retention_s(st)
    await wait_for_tenant(st, tid, ALL_TOPICS)  # read-your-writes: every outcome and acknowledgement so far
    found = await _metrics_post(st, "/internal/messages/cleanup", {"tenant_id": tid, "older_than_seconds": older})
    ids = [str(i) for i in (found or {}).get("ids") or ()]
    await _append_ids(st, "messages.cleanup", tid, actor, "POST /commands/cleanup-messages", ids)
    return CleanupMessagesOut(removed=len(ids))
