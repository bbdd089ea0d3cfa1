"""Instance config, bounce reload, status, command log and its export, analytics replay (and its
progress), digests of the config views (for ``postbus replay views``)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import httpx
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from services.api import command_log
from services.api.auth import authenticate, require_admin
from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import (
    BounceConfigOut,
    CommandLogEntry,
    CommandLogPage,
    GenroCommand,
    InstanceIn,
    InstanceOut,
    InstanceResp,
    Ok,
    StatusOut,
    errors,
)
from services.api.routes_tenants import iso
from services.api.state import ApiState
from services.common import view_digest
from services.common.config_view import ConfigView
from services.common.topics import CONFIG_INSTANCE

router = APIRouter()
log = logging.getLogger("postbus.api.admin")

INSTANCE_KEY = "instance"
DEFAULT_RETENTION_S = 7 * 86400
_BOUNCE_FIELDS = ("imap_host", "imap_port", "imap_user", "mailbox", "poll_interval_seconds")


def instance_record(st: ApiState) -> dict[str, Any]:
    """The stored instance config, or the defaults when none was ever written."""
    stored = st.instance.get(INSTANCE_KEY) if st.instance is not None else None
    if stored is not None:
        return dict(stored)
    return {"name": None, "active": True, "sync_interval_seconds": None,
            "report_retention_seconds": DEFAULT_RETENTION_S, "bounce_enabled": False, "bounce_imap_host": None,
            "bounce_imap_port": None, "bounce_imap_user": None, "bounce_imap_password_enc": None,
            "bounce_mailbox": None, "bounce_poll_interval_seconds": None, "updated_ts": 0}


def instance_out(st: ApiState, rec: dict[str, Any]) -> InstanceOut:
    return InstanceOut(
        name=rec.get("name"),
        active=rec.get("active", True),
        sync_interval_seconds=rec.get("sync_interval_seconds") or int(st.settings.reporter_sync_interval_s),
        report_retention_seconds=rec.get("report_retention_seconds", DEFAULT_RETENTION_S),
        bounce=BounceConfigOut(
            enabled=rec.get("bounce_enabled", False),
            has_imap_password=bool(rec.get("bounce_imap_password_enc")),
            **{f: rec.get(f"bounce_{f}") for f in _BOUNCE_FIELDS},
        ),
        updated_at=iso(rec.get("updated_ts")) if rec.get("updated_ts") else None,
    )


@router.get("/status", tags=["core"], response_model=StatusOut, summary="Scheduler state (any valid token)",
            responses=errors(401))
async def status(request: Request) -> StatusOut:
    st = state_of(request)
    authenticate(request, st)
    return StatusOut(active=instance_record(st).get("active", True))


@router.get("/instance", tags=["instance"], response_model=InstanceResp, summary="Instance configuration (admin)",
            responses=errors(401, 403))
async def get_instance(request: Request) -> InstanceResp:
    st = state_of(request)
    require_admin(authenticate(request, st))
    return InstanceResp(instance=instance_out(st, instance_record(st)))


@router.put("/instance", tags=["instance"], response_model=InstanceResp,
            summary="Update the instance configuration (admin; partial, secrets write-only)",
            responses=errors(401, 403, 422))
async def put_instance(body: InstanceIn, request: Request) -> InstanceResp:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    given = body.model_fields_set
    out: dict[str, Any] = {}

    def build() -> ConfigWrite:  # from the view caught up to the end: re-run if another API instance wrote
        rec = instance_record(st)
        if "name" in given:
            rec["name"] = body.name
        for f in ("active", "sync_interval_seconds", "report_retention_seconds"):
            if f in given and getattr(body, f) is not None:
                rec[f] = getattr(body, f)
        if body.bounce is not None:
            b = body.bounce
            bgiven = b.model_fields_set
            if b.enabled is not None:
                rec["bounce_enabled"] = b.enabled
            for f in _BOUNCE_FIELDS:
                if f in bgiven:
                    rec[f"bounce_{f}"] = getattr(b, f)
            if "imap_password" in bgiven:  # null or "" clears it
                rec["bounce_imap_password_enc"] = st.box.encrypt(b.imap_password)
        rec["updated_ts"] = int(time.time() * 1000)
        out["rec"] = rec
        return ConfigWrite("instance.update", None, actor, "PUT /instance", "Instance", rec,
                           [ConfigRecord(CONFIG_INSTANCE, INSTANCE_KEY, "Instance", rec)])

    assert st.instance is not None
    offsets = await st.writer.update_config("instance", st.instance.catch_up, build)
    rec = out["rec"]
    await st.wait_visible(offsets)
    return InstanceResp(instance=instance_out(st, rec))


@router.post("/instance/reload-bounce", tags=["instance"], response_model=Ok,
             summary="Reload bounce-processing configuration and rules (admin)", responses=errors(401, 403))
async def reload_bounce(request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    await st.writer.append("bounce.reload", None, actor, "POST /instance/reload-bounce", "BounceReload",
                           {"requested_ts": int(time.time() * 1000)})
    return Ok()


def _filters(tenant_id: str | None, since: float | None, until: float | None, route: str | None,
             ctype: str | None) -> command_log.Filters:
    for name, v in (("since", since), ("until", until)):
        if v is not None and not math.isfinite(v):
            raise ApiError(400, "invalid_time", f"{name} must be a finite number")
    return command_log.Filters(tenant_id=tenant_id or None, since_ms=command_log.to_ms(since),
                               until_ms=command_log.to_ms(until), route=route or None, type=ctype or None)


_TIME_DOC = "unix seconds (values above 1e11 are read as milliseconds)"


@router.get("/command-log", tags=["command log"], response_model=CommandLogPage,
            summary="Audit of accepted state-changing commands, from the command topic (admin)",
            responses=errors(400, 401, 403, 422))
async def get_command_log(
    request: Request,
    tenant_id: str | None = Query(None),
    since: float | None = Query(None, ge=0, le=1e14, description=_TIME_DOC),
    until: float | None = Query(None, ge=0, le=1e14, description=_TIME_DOC),
    route: str | None = Query(None, description='e.g. "POST /tenant" or "/tenant"'),
    type: str | None = Query(None, description="command type, e.g. tenant.create"),
    limit: int = Query(command_log.DEFAULT_LIMIT, ge=1, description="at most 1000"),
    cursor: str | None = Query(None, max_length=10000, description="next_cursor of the previous page"),
    since_ts: float | None = Query(None, ge=0, le=1e14, description="genro 0.6 name of since"),
) -> CommandLogPage:
    st = state_of(request)
    require_admin(authenticate(request, st))
    filters = _filters(tenant_id, since if since is not None else since_ts, until, route, type)
    try:
        entries, next_cursor = await command_log.read_page(st.settings.kafka_bootstrap, filters, cursor, limit)
    except command_log.InvalidCursor as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from exc
    except (KafkaError, command_log.CommandLogUnavailable) as exc:
        raise ApiError(503, "command_log_unavailable", f"the command topic cannot be read: {exc}") from exc
    return CommandLogPage(entries=[CommandLogEntry(**e) for e in entries], count=len(entries),
                          commands=[GenroCommand(id=e["command_id"], command_ts=e["ts"] / 1000.0,
                                                 endpoint=e.get("route"), tenant_id=e.get("tenant_id"),
                                                 payload=e.get("payload")) for e in entries],
                          next_cursor=next_cursor)


@router.get("/command-log/export", tags=["command log"], response_class=StreamingResponse,
            summary="Export the command log as JSON lines, in order, secrets redacted (admin)",
            responses={200: {"description": "one redacted command envelope per line",
                             "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                       **errors(400, 401, 403, 422)})
async def export_command_log(
    request: Request,
    tenant_id: str | None = Query(None),
    since: float | None = Query(None, ge=0, le=1e14, description=_TIME_DOC),
    until: float | None = Query(None, ge=0, le=1e14, description=_TIME_DOC),
    route: str | None = Query(None),
    type: str | None = Query(None),
) -> StreamingResponse:
    st = state_of(request)
    require_admin(authenticate(request, st))
    filters = _filters(tenant_id, since, until, route, type)
    try:
        lines = await command_log.open_export(st.settings.kafka_bootstrap, filters)
    except (KafkaError, command_log.CommandLogUnavailable) as exc:
        raise ApiError(503, "command_log_unavailable", f"the command topic cannot be read: {exc}") from exc
    return StreamingResponse(lines, media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="command-log.ndjson"'})


class MetricsReplayIn(BaseModel):
    confirm: bool = Field(False, description="must be true: the analytics tables are dropped and rebuilt")


@router.post("/admin/replay/metrics", tags=["instance"], status_code=202, response_model=Ok,
             summary="Drop the analytics (ClickHouse) tables and rebuild them from the event log (admin)",
             responses=errors(400, 401, 403, 422))
async def replay_metrics(request: Request, body: MetricsReplayIn | None = None) -> Ok:
    """The operators' only way to the metrics service's internal replay: admin token, explicit
    ``{"confirm": true}``; the API calls the metrics service with the internal service credential.
    Progress: ``rows``/``caught_up`` of the metrics service's ingest status."""
    st = state_of(request)
    require_admin(authenticate(request, st))
    if body is None or not body.confirm:
        raise ApiError(400, "confirmation_required",
                       'replay drops and rebuilds every analytics table: send {"confirm": true}')
    try:
        r = await st.metrics.post("/internal/replay", headers={"X-Postbus-Actor": "admin"}, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ApiError(503, "metrics_unavailable", "the metrics service did not answer") from exc
    if r.status_code != 202:
        raise ApiError(503, "metrics_unavailable", f"the metrics service answered {r.status_code}")
    log.info("metrics replay requested by the admin")
    return Ok()


@router.get("/admin/replay/metrics", tags=["instance"],
            summary="Progress of the analytics (ClickHouse) ingest: offsets loaded per topic, replaying (admin)",
            responses=errors(401, 403))
async def replay_metrics_status(request: Request) -> dict[str, Any]:
    """The metrics service's ingest status for the admin (its port is internal): ``topics`` (next
    offset loaded per topic and partition), ``caught_up``, ``replaying``, ``rows``. ``postbus replay
    analytics`` follows a rebuild with it."""
    st = state_of(request)
    require_admin(authenticate(request, st))
    try:
        r = await st.metrics.get("/internal/ingest-status", timeout=30.0)
    except httpx.HTTPError as exc:
        raise ApiError(503, "metrics_unavailable", "the metrics service did not answer") from exc
    if r.status_code != 200:
        raise ApiError(503, "metrics_unavailable", f"the metrics service answered {r.status_code}")
    body = r.json()
    return {"ok": True, **{k: body.get(k) for k in ("topics", "partitions", "caught_up", "replaying", "rows")}}


def _config_views(request: Request, st: ApiState) -> list[ConfigView]:
    """Every config view this API process holds (one per compacted topic)."""
    views: list[Any] = [st.tenants, st.accounts, st.apikeys, st.instance, st.suspensions, st.sync_status]
    if st.provider is not None:
        views += st.provider.all()
    domains = getattr(request.app.state, "postbus_domains", None)
    if domains is not None:
        views += [domains.domains, domains.status]
    views.append(getattr(request.app.state, "postbus_suppressions", None))
    out: dict[str, ConfigView] = {}
    for v in views:
        if isinstance(v, ConfigView):
            out.setdefault(v.topic, v)
    return [out[t] for t in sorted(out)]


@router.get("/admin/views/digest", tags=["instance"],
            summary="Salted digests of every record of the API's config views, with the offsets they hold (admin)",
            responses=errors(401, 403, 422))
async def views_digest(request: Request, salt: str = Query(..., description="32 to 128 hex digits, random per call")
                       ) -> dict[str, Any]:
    """For ``postbus replay views``: each view caught up with its topic, then, per view, the offsets it
    holds and ``key -> digest`` of its records (services/common/view_digest.py). No record is returned,
    only salted digests."""
    st = state_of(request)
    require_admin(authenticate(request, st))
    try:
        salt_bytes = view_digest.parse_salt(salt)
    except ValueError as exc:
        raise ApiError(422, "invalid_salt", str(exc)) from None
    out = []
    for v in _config_views(request, st):
        try:
            await v.catch_up(timeout=10.0)
        except (TimeoutError, KafkaError) as exc:
            raise ApiError(503, "views_unavailable", f"the view of {v.topic} did not catch up") from exc
        # no await from here to the digests: the offsets and the records are the same moment's
        applied, items = v.applied(), dict(v.items)
        out.append({"topic": v.topic, "schema": v.schema, "applied": {str(p): o for p, o in sorted(applied.items())},
                    "count": len(items), "digests": view_digest.view_digests(salt_bytes, items)})
    return {"ok": True, "views": out}
