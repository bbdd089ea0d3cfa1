"""BI aggregates API (issue 13, "Analysts"; docs/bi.md): ``GET /api/v1/bi/metrics``.

Under the tenant SMTP API's conventions (``{success, data}`` envelope, its error shape and codes,
the same ``X-API-Token`` / ``Authorization: Bearer`` headers):

- the admin token and a support principal holding ``bi:read`` read across tenants (optionally
  filtered by ``tenant_id``); a principal without ``bi:read`` gets 403. Every principal access is
  audited (a ``support.access`` command, as for the tenant SMTP API) before data is returned;
- a tenant API key reads its own tenant only: ``tenant_id`` defaults to it, another one -> 403.

The numbers come from the metrics service (``GET /internal/bi/metrics``, services/metrics/bi.py,
materialized hourly aggregates): the event counts (``sent``, ``opened``, ...) and, unless
``distinct=false``, the distinct-message counts next to them (``messages_sent``, ``unique_opens``,
...) with their rates. Read-your-writes: before asking, the route waits until the
metrics ingest holds every delivery event on the topic at request time (the tenant's partition
for a tenant-scoped query, every partition otherwise), like the message listing
(projection.py). Rates and reputation bands are computed here (services/api/reputation.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from aiokafka import TopicPartition
from fastapi import APIRouter, Query, Request

from services.api.auth import authenticate
from services.api.commands import Actor
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.projection import HTTP_MARGIN_S, WAIT_PATH, ProjectionUnavailable, wait_for_tenant
from services.api.reputation import Thresholds, assess, thresholds_from
from services.api.smtp_access import _support
from services.api.state import ApiState
from services.common.topics import EVENTS

log = logging.getLogger("postbus.api.bi")

router = APIRouter(prefix="/api/v1/bi", tags=["bi"])
SCOPE = "bi:read"
DEFAULT_WINDOW_S = 30 * 86400
CRITICAL_FACTOR = 2.0  # a rate above twice its at-risk threshold is "critical"
BUCKETS = ("hour", "day")
GROUP_BY = ("tenant", "domain", "provider", "campaign", "account")
MAX_TOP = 100
MAX_WINDOW_S = 400 * 86400
COUNT_FIELDS = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors")
# distinct messages (docs/bi.md, "Distinct messages"): added next to the event counts, whose
# meaning is unchanged; left out with ``distinct=false``
DISTINCT_FIELDS = ("messages_sent", "messages_delivered", "messages_bounced", "messages_complained",
                   "unique_opens", "unique_clicks")


def _ratios(c: dict[str, Any], sent_col: str, delivered_col: str, over_sent: dict[str, str],
            over_delivered: dict[str, str]) -> dict[str, float]:
    sent, delivered = int(c.get(sent_col, 0)), int(c.get(delivered_col, 0))

    def ratio(n: Any, d: int) -> float:
        return round(int(n) / d, 6) if d else 0.0

    return {**{name: ratio(c.get(col, 0), sent) for name, col in over_sent.items()},
            **{name: ratio(c.get(col, 0), delivered) for name, col in over_delivered.items()}}


def rates(c: dict[str, Any]) -> dict[str, float]:
    """Bounce and complaint rates over sent (as reputation.py), open and click rates over delivered."""
    return _ratios(c, "sent", "delivered",
                   {"delivery_rate": "delivered", "bounce_rate": "bounced", "complaint_rate": "complained"},
                   {"open_rate": "opened", "click_rate": "clicked"})


def distinct_rates(c: dict[str, Any]) -> dict[str, float]:
    """The same rates over distinct messages: delivered / bounced / complained messages over
    messages sent, messages opened / clicked over messages delivered."""
    return _ratios(c, "messages_sent", "messages_delivered",
                   {"message_delivery_rate": "messages_delivered", "message_bounce_rate": "messages_bounced",
                    "message_complaint_rate": "messages_complained"},
                   {"unique_open_rate": "unique_opens", "unique_click_rate": "unique_clicks"})


def figures(c: dict[str, Any], distinct: bool, with_rates: bool = True) -> dict[str, Any]:
    """One totals / group / series entry: the event counts (and rates), then with ``distinct``
    the distinct-message counts (and their rates)."""
    out: dict[str, Any] = {f: int(c.get(f, 0)) for f in COUNT_FIELDS}
    if with_rates:
        out.update(rates(c))
    if distinct:
        out.update({f: int(c.get(f, 0)) for f in DISTINCT_FIELDS})
        if with_rates:
            out.update(distinct_rates(c))
    return out


def band(c: dict[str, Any], t: Thresholds) -> str:
    """healthy | watch | at_risk from reputation.assess; critical when a rate is above
    CRITICAL_FACTOR times its at-risk threshold (with at least ``min_volume`` sent)."""
    name, _, bounce_rate, complaint_rate = assess(
        {"sent": c.get("sent", 0), "bounced": c.get("bounced", 0), "complaints": c.get("complained", 0)}, t)
    if int(c.get("sent", 0)) >= t.min_volume and (bounce_rate > CRITICAL_FACTOR * t.bounce_at_risk
                                                  or complaint_rate > CRITICAL_FACTOR * t.complaint_at_risk):
        return "critical"
    return name


async def _principal(request: Request, st: ApiState, tenant_id: str | None) -> tuple[Actor, str | None]:
    """(who, the tenant filter to apply: None = every tenant)."""
    support = _support(request, st)
    if support is not None:
        if SCOPE not in support.scopes:
            raise ApiError(403, "insufficient_permissions", f"missing scopes: {SCOPE}")
        actor = Actor("support", tenant_id, support.name)
        await st.writer.append("support.access", tenant_id, actor, f"GET {request.url.path}", "SupportAccess",
                               {"principal": support.name, "tenant_id": tenant_id or "*",
                                "route": request.url.path, "scopes": [SCOPE]})
        log.info("support access", extra={"principal": support.name, "tenant_id": tenant_id or "*",
                                          "route": request.url.path})
        return actor, tenant_id
    actor = authenticate(request, st)
    if actor.kind == "admin":
        return actor, tenant_id
    if actor.kind == "tenant":
        if tenant_id is not None and tenant_id != actor.tenant_id:
            raise ApiError(403, "insufficient_permissions", "this token is not valid for that tenant")
        return actor, actor.tenant_id
    raise ApiError(403, "insufficient_permissions", "this token may not read BI aggregates")


async def _wait_all_events(st: ApiState) -> None:
    """Read-your-writes across tenants: every partition of the events topic up to its end offset now."""
    timeout = st.settings.projection_wait_timeout_s
    try:
        reader = await st.writer._reader()
        n = await st.writer._partitions(EVENTS)
        ends = await asyncio.wait_for(reader.end_offsets([TopicPartition(EVENTS, p) for p in range(n)]),
                                      min(timeout, 5.0))
    except Exception as exc:  # the broker is unreachable: answer from what is loaded
        log.warning("events end offsets unavailable; BI answer without waiting", extra={"error": repr(exc)})
        return
    offsets = [{"topic": EVENTS, "partition": tp.partition, "offset": int(o)} for tp, o in ends.items() if o > 0]
    if not offsets:
        return
    try:
        r = await st.metrics.post(WAIT_PATH, json={"offsets": offsets, "timeout_s": timeout},
                                  timeout=timeout + HTTP_MARGIN_S)
    except httpx.HTTPError:
        raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable") from None
    if r.status_code != 200:
        raise ProjectionUnavailable("the metrics store did not catch up with the latest events; retry later")


@router.get("/metrics", summary="Cross-tenant delivery aggregates: totals, time series, top groups")
async def bi_metrics(
    request: Request,
    from_ts: int | None = Query(None, description="window start, epoch seconds (default: to_ts - 30 days)"),
    to_ts: int | None = Query(None, description="window end, epoch seconds (default: now)"),
    bucket: str = Query("hour", description="hour | day"),
    group_by: str | None = Query(None, description="tenant | domain | provider | campaign | account"),
    top: int = Query(10, description="groups returned, by sent, 1..100"),
    tenant_id: str | None = Query(None, description="only this tenant (a tenant key: its own, the default)"),
    distinct: bool = Query(True, description="also the distinct-message counts and rates (messages_sent, "
                                             "unique_opens, ...); false: the event counts only, cheaper"),
) -> dict[str, Any]:
    st = state_of(request)
    _, scope = await _principal(request, st, tenant_id)
    end = int(time.time()) if to_ts is None else to_ts
    start = end - DEFAULT_WINDOW_S if from_ts is None else from_ts
    params: dict[str, Any] = {"from_ts": start, "to_ts": end, "bucket": bucket, "top": top,
                              "distinct": "true" if distinct else "false"}
    if group_by is not None:
        params["group_by"] = group_by
    if scope is not None:
        params["tenant_id"] = scope
    validate(start, end, bucket, group_by, top)
    if scope is not None:
        await wait_for_tenant(st, scope, (EVENTS,))
    else:
        await _wait_all_events(st)
    try:
        r = await st.metrics.get("/internal/bi/metrics", params=params, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable") from exc
    if r.status_code == 422:
        raise ApiError(422, "validation_error", _message(r))
    if r.status_code != 200:
        raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable")
    data = r.json()
    t = thresholds_from(st.settings)
    totals = figures(data["totals"], distinct)
    groups = [{"key": g["key"], **figures(g, distinct), "reputation_band": band(g, t)} for g in data["groups"]]
    series = [{"ts": s["ts"], **figures(s, distinct, with_rates=False)} for s in data["series"]]
    return {"success": True, "data": {"from_ts": start, "to_ts": end, "bucket": bucket, "group_by": group_by,
                                      "distinct": distinct, "totals": totals, "series": series, "groups": groups}}


def validate(start: int, end: int, bucket: str, group_by: str | None, top: int) -> None:
    """The metrics service's rules (services/metrics/bi.py validates again; no import between
    services), checked here so a bad request costs no wait: 422 ``VALIDATION_ERROR``."""
    if bucket not in BUCKETS:
        raise ApiError(422, "validation_error", "bucket must be hour or day")
    if group_by is not None and group_by not in GROUP_BY:
        raise ApiError(422, "validation_error", "group_by must be one of " + ", ".join(GROUP_BY))
    if not 1 <= top <= MAX_TOP:
        raise ApiError(422, "validation_error", f"top must be between 1 and {MAX_TOP}")
    if start < 0 or end <= start:
        raise ApiError(422, "validation_error", "from_ts and to_ts must be epoch seconds with from_ts < to_ts")
    if end - start > MAX_WINDOW_S:
        raise ApiError(422, "validation_error", f"the window must be at most {MAX_WINDOW_S // 86400} days")


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "request is not valid"
