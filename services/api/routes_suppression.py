"""Suppression list per tenant: ``GET/POST /suppressions``, ``DELETE /suppressions/{address}``.

Entries live on the compacted topic ``postbus.config.suppression-list`` (key ``tenant/address``,
address lowercased), each written in one transaction with its ``suppression.add`` /
``suppression.remove`` command. The sender refuses suppressed recipients; hard bounces, complaints
and unsubscribes are added automatically (services/sender/engagement.py, routes_tracking)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field

from services.api.auth import authenticate, scope_tenant
from services.api.commands import Actor, ConfigRecord
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.message_validation import valid_address
from services.api.models import Ok, errors
from services.api.state import ApiState
from services.common.config_view import ConfigView
from services.common.topics import CONFIG_SUPPRESSION_LIST


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    view = ConfigView(app.state.postbus.settings.kafka_bootstrap, CONFIG_SUPPRESSION_LIST, "SuppressionEntry")
    await view.start()
    app.state.postbus_suppressions = view
    try:
        yield
    finally:
        await view.stop()


router = APIRouter(tags=["suppression list"], lifespan=_lifespan)

Reason = Literal["manual", "hard_bounce", "complaint", "unsubscribe"]
MAX_ADDRESSES = 1000


class SuppressionIn(BaseModel):
    tenant_id: str | None = Field(None, max_length=128, description="defaults to the calling tenant")
    addresses: list[str] = Field(..., min_length=1, max_length=MAX_ADDRESSES)
    reason: Reason = "manual"


class SuppressionOut(BaseModel):
    address: str
    reason: str = Field(..., description="hard_bounce | complaint | unsubscribe | manual")
    detail: str | None = None
    source: str | None = Field(None, description="api | one-click | ses | dsn-smtp | arf | ...")
    created_at: str = Field(..., description="ISO 8601, UTC")


class SuppressionPage(BaseModel):
    ok: bool = True
    tenant_id: str
    suppressions: list[SuppressionOut]
    total: int
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class SuppressionAdded(BaseModel):
    ok: bool = True
    added: int = Field(..., description="addresses newly suppressed")
    already: int = Field(..., description="addresses that were already on the list")


def suppression_view(request: Request) -> ConfigView:
    return request.app.state.postbus_suppressions  # type: ignore[no-any-return]


def entry_key(tenant_id: str, address: str) -> str:
    return f"{tenant_id}/{address.strip().lower()}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tenant(request: Request, st: ApiState, tenant_id: str | None) -> tuple[Actor, str]:
    actor = authenticate(request, st)
    tid = scope_tenant(actor, tenant_id)
    if not tid:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    if st.tenants.get(tid) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tid!r} does not exist")
    return actor, tid


async def write(request: Request, ctype: str, tenant_id: str, actor: Actor, route: str, payload_schema: str,
                payload: dict[str, Any], records: list[ConfigRecord]) -> None:
    """Command + suppression records in one transaction, then wait until this API sees them."""
    st = state_of(request)
    try:
        offsets = await st.writer.append_config(ctype, tenant_id, actor, route, payload_schema, payload, records)
        view = suppression_view(request)
        if CONFIG_SUPPRESSION_LIST in offsets:
            await view.wait_for(offsets[CONFIG_SUPPRESSION_LIST], st.settings.write_timeout_s)
    except (KafkaError, TimeoutError) as exc:
        raise ApiError(503, "log_unavailable", "the event log did not take the write; retry") from exc


def new_entry(tenant_id: str, address: str, reason: str, source: str, detail: str | None = None) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "address": address.strip().lower(), "reason": reason, "detail": detail,
            "source": source, "created_ts": int(time.time() * 1000)}


@router.get("/suppressions", response_model=SuppressionPage, summary="List the tenant's suppressed addresses",
            responses=errors(400, 401, 404, 422))
async def list_suppressions(request: Request, tenant_id: str | None = Query(None, max_length=128),
                            limit: int = Query(100, ge=1, le=1000),
                            cursor: str | None = Query(None, max_length=400,
                                                       description="the last address of the previous page")
                            ) -> SuppressionPage:
    st = state_of(request)
    _, tid = _tenant(request, st, tenant_id)
    prefix = f"{tid}/"
    entries = sorted((v for k, v in list(suppression_view(request).items.items()) if k.startswith(prefix)),
                     key=lambda e: e["address"])
    page = [e for e in entries if cursor is None or e["address"] > cursor.lower()][:limit]
    more = bool(page) and page[-1]["address"] != entries[-1]["address"]
    return SuppressionPage(
        tenant_id=tid, total=len(entries), next_cursor=page[-1]["address"] if more else None,
        suppressions=[SuppressionOut(address=e["address"], reason=e["reason"], detail=e.get("detail"),
                                     source=e.get("source"), created_at=iso(e["created_ts"])) for e in page])


@router.post("/suppressions", response_model=SuppressionAdded,
             summary="Add addresses to the tenant's suppression list (never sent to again)",
             responses=errors(400, 401, 404, 422))
async def add_suppressions(body: SuppressionIn, request: Request) -> SuppressionAdded:
    st = state_of(request)
    actor, tid = _tenant(request, st, body.tenant_id)
    addresses = sorted({a.strip().lower() for a in body.addresses})
    bad = [a for a in addresses if not valid_address(a)]
    if bad:
        raise ApiError(400, "invalid_address", f"not an email address: {bad[0][:100]!r}")
    view = suppression_view(request)
    new = [a for a in addresses if view.get(entry_key(tid, a)) is None]
    if new:
        records = [ConfigRecord(CONFIG_SUPPRESSION_LIST, entry_key(tid, a), "SuppressionEntry",
                                new_entry(tid, a, body.reason, "api")) for a in new]
        await write(request, "suppression.add", tid, actor, "POST /suppressions", "SuppressionChange",
                    {"tenant_id": tid, "addresses": new, "reason": body.reason, "source": "api"}, records)
    return SuppressionAdded(added=len(new), already=len(addresses) - len(new))


@router.delete("/suppressions/{address}", response_model=Ok,
               summary="Remove an address from the tenant's suppression list",
               responses=errors(400, 401, 404))
async def remove_suppression(address: str, request: Request,
                             tenant_id: str | None = Query(None, max_length=128)) -> Ok:
    st = state_of(request)
    actor, tid = _tenant(request, st, tenant_id)
    key = entry_key(tid, address)
    if len(address) > 320 or suppression_view(request).get(key) is None:
        raise ApiError(404, "suppression_not_found", "that address is not on the tenant's suppression list")
    await write(request, "suppression.remove", tid, actor, "DELETE /suppressions/{address}", "SuppressionChange",
                {"tenant_id": tid, "addresses": [address.strip().lower()], "reason": None, "source": "api"},
                [ConfigRecord(CONFIG_SUPPRESSION_LIST, key, None, None)])
    return Ok()
