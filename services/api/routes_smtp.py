"""Tenant SMTP API (seed: tenant-smtp-rest-api-contract.md): ``{success, data}`` envelope."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Query, Request

from services.api.deps import state_of
from services.api.email_auth_check import spf_dmarc
from services.api.errors import ApiError
from services.api.reputation import assess, thresholds_from
from services.api.smtp_access import authorize
from services.api.state import ApiState

router = APIRouter(prefix="/api/v1/tenants/{tenant_id}/smtp", tags=["tenant smtp"])
WINDOW = re.compile(r"^[1-9][0-9]{0,3}[hd]$")


async def _window_counts(st: ApiState, tenant_id: str, window: str) -> dict[str, Any]:
    if not WINDOW.match(window):
        raise ApiError(400, "validation_error", "window must look like 24h, 7d or 30d")
    try:
        r = await st.metrics.get(f"/internal/tenants/{tenant_id}/metrics", params={"window": window})
    except Exception as exc:
        raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable") from exc
    if r.status_code == 422:
        raise ApiError(400, "validation_error", "window is out of range")
    if r.status_code != 200:
        raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable")
    return r.json()  # type: ignore[no-any-return]


def _domain_states(request: Request, tenant_id: str) -> list[tuple[str, str]]:
    """(domain, enforced status) of the tenant's registered sending domains."""
    runtime = getattr(request.app.state, "postbus_domains", None)
    if runtime is None:
        return []
    out = []
    for rec in runtime.domains.items.values():
        if rec.get("tenant_id") != tenant_id:
            continue
        status = runtime.status.get(rec["name"])
        if status is not None and status.get("tenant_id") != tenant_id:
            status = None
        fresh = status and status.get("status") and status.get("updated_ts", 0) >= rec.get("updated_ts", 0)
        out.append((rec["name"], str(status["status"] if fresh else rec.get("status") or "active")))
    return sorted(out)


def _sending_state(request: Request, st: ApiState, tenant_id: str) -> tuple[list[str], list[str]]:
    """Whether the tenant's mail goes out now, and why not / what holds part of it: the instance
    switch, the tenant's active flag, its suspend-all or suspended batches, suspended domains.
    Returns (what stops all of it, what holds part of it); sending is enabled when the first is empty."""
    blocked: list[str] = []
    partial: list[str] = []
    instance = st.instance.get("instance") if st.instance is not None else None
    if instance is not None and instance.get("active") is False:
        blocked.append("sending is paused for the whole instance")
    if (st.tenants.get(tenant_id) or {}).get("active", True) is False:
        blocked.append("the tenant is inactive")
    susp = st.suspensions.get(tenant_id) if st.suspensions is not None else None
    if susp and susp.get("all"):
        blocked.append("all of the tenant's mail is suspended")
    elif susp and susp.get("batches"):
        partial.append("suspended batches: " + ", ".join(susp["batches"]))
    domains = _domain_states(request, tenant_id)
    suspended = [name for name, status in domains if status == "suspended"]
    if domains and len(suspended) == len(domains):
        blocked.append("every sending domain is suspended: " + ", ".join(suspended))
    elif suspended:
        partial.append("suspended sending domains: " + ", ".join(suspended))
    return blocked, partial


@router.get("/metrics", summary="Aggregated deliverability metrics over a window")
async def smtp_metrics(tenant_id: str, request: Request,
                       window: str = Query("24h", description="Nh or Nd, e.g. 24h, 7d, 30d"),
                       group_by: str | None = Query(None, description="campaign: counts per provider-API "
                                                    "campaign (docs/campaigns.md)")) -> dict[str, Any]:
    st = state_of(request)
    await authorize(request, st, tenant_id, {"smtp:read"})
    if group_by is not None:  # provider-API campaigns (services/metrics/campaigns.py)
        if group_by != "campaign":
            raise ApiError(400, "validation_error", "group_by must be campaign")
        if not WINDOW.match(window):
            raise ApiError(400, "validation_error", "window must look like 24h, 7d or 30d")
        try:
            r = await st.metrics.get(f"/internal/tenants/{tenant_id}/metrics",
                                     params={"window": window, "group_by": "campaign"})
        except Exception as exc:
            raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable") from exc
        if r.status_code != 200:
            raise ApiError(503, "metrics_unavailable", "metrics are temporarily unavailable")
        groups = [{"campaign_id": int(g.pop("key")), **g} for g in r.json()["groups"]]
        return {"success": True, "data": {"window": window, "group_by": "campaign", "campaigns": groups}}
    m = await _window_counts(st, tenant_id, window)
    band, recommendations, _, _ = assess(m, thresholds_from(st.settings))
    if _sending_state(request, st, tenant_id)[0]:
        band = "suspended"
    data = {
        "window": window,
        "sent": m.get("sent", 0),
        "delivered": m.get("delivered", 0),
        "bounced": m.get("bounced", 0),
        "complaints": m.get("complaints", 0),
        "opens": m.get("opens", 0),
        "clicks": m.get("clicks", 0),
        "errors": m.get("error", 0),
        "deferred": m.get("deferred", 0),
        "reputation_band": band,
        "recommendations": recommendations,
    }
    return {"success": True, "data": data}


@router.get("/status", summary="Operational health of the tenant's sending (last 24 hours)")
async def smtp_status(tenant_id: str, request: Request) -> dict[str, Any]:
    st = state_of(request)
    await authorize(request, st, tenant_id, {"smtp:read"})
    m = await _window_counts(st, tenant_id, "24h")
    band, recommendations, bounce_rate, complaint_rate = assess(m, thresholds_from(st.settings))
    blocked, partial = _sending_state(request, st, tenant_id)
    held = int(m.get("throttled", 0))
    if held:
        partial.append(f"{held} message(s) held by rate limits or destination throttling")
    if blocked:
        band = "suspended"
    notes = blocked + partial + [r["message"] for r in recommendations if r["severity"] != "info"]
    return {"success": True, "data": {
        "sending_enabled": not blocked,
        "recent_bounce_rate": round(bounce_rate, 6),
        "recent_complaint_rate": round(complaint_rate, 6),
        "reputation_band": band,
        # throttled: part of the tenant's mail is held now (limits, suspended batches or domains)
        "enforcement": {"throttled": bool(blocked or partial), "notes": "; ".join(notes) or None},
    }}


def _sum_limit(values: list[int | None]) -> int | None:
    """A tenant-wide limit is the sum over its accounts; one unlimited account makes it unlimited."""
    if not values or any(v is None or v <= 0 for v in values):  # 0 or negative: unlimited
        return None
    return sum(v for v in values if v is not None)


# Domain record dkim_status (seed vocabulary of ses-status) -> the tenant API's vocabulary
_DKIM_STATUS = {"Success": "verified", "NotStarted": "not_configured", "Failed": "failed",
                "TemporaryFailure": "failed", "Pending": "pending"}


async def _from_domains(request: Request, tenant_id: str, tenant: dict[str, Any]) -> list[dict[str, Any]]:
    """The tenant's registered sending domains (outbound domain API), with DKIM from the domain
    record and SPF/DMARC read from DNS (services/api/email_auth_check.py)."""
    runtime = getattr(request.app.state, "postbus_domains", None)
    if runtime is None:
        return []
    settings = state_of(request).settings
    records = sorted((r for r in runtime.domains.items.values() if r.get("tenant_id") == tenant_id),
                     key=lambda r: r["name"])
    checks = await asyncio.gather(*(spf_dmarc(r["name"], settings.dns_resolvers, settings.dns_timeout_s)
                                    for r in records))
    return [{"domain": r["name"],
             "dkim_status": _DKIM_STATUS.get(r.get("dkim_status") or "NotStarted", "pending"),
             "spf_status": spf,
             "dmarc_status": dmarc,
             "tracking_domain": tenant.get("tracking_domain")} for r, (spf, dmarc) in zip(records, checks, strict=True)]


def _default_from(tenant: dict[str, Any]) -> dict[str, Any] | None:
    email = tenant.get("default_from_email")
    return {"name": tenant.get("default_from_name"), "email": email} if email else None


@router.get("/config", summary="Effective SMTP configuration visible to the tenant")
async def smtp_config(tenant_id: str, request: Request) -> dict[str, Any]:
    st = state_of(request)
    await authorize(request, st, tenant_id, {"smtp:read", "tenant:read"})
    accounts = [a for a in st.accounts.items.values() if a["tenant_id"] == tenant_id]
    if not accounts:
        raise ApiError(404, "not_found", "the tenant has no SMTP configuration")
    tenant = st.tenants.get(tenant_id) or {}
    hourly = tenant.get("rate_limit_hourly")
    return {"success": True, "data": {
        "tenant_id": tenant_id,
        "from_domains": await _from_domains(request, tenant_id, tenant),
        "default_from": _default_from(tenant),
        "rate_limits": {
            "max_per_minute": _sum_limit([a.get("limit_per_minute") for a in accounts]),
            "max_per_hour": hourly or _sum_limit([a.get("limit_per_hour") for a in accounts]),
        },
    }}
