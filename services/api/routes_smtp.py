"""Tenant SMTP API (seed: tenant-smtp-rest-api-contract.md): ``{success, data}`` envelope."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Query, Request

from services.api.auth import authenticate
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.reputation import assess

router = APIRouter(prefix="/api/v1/tenants/{tenant_id}/smtp", tags=["tenant smtp"])
WINDOW = re.compile(r"^[1-9][0-9]{0,3}[hd]$")


@router.get("/metrics")
async def smtp_metrics(tenant_id: str, request: Request,
                       window: str = Query("24h", description="Nh or Nd, e.g. 24h, 7d, 30d")) -> dict[str, Any]:
    st = state_of(request)
    actor = authenticate(request, st)
    if actor.kind == "tenant" and actor.tenant_id != tenant_id:
        # same answer as for a tenant that does not exist: no probing of other tenants' ids
        raise ApiError(404, "not_found", "tenant not found")
    if st.tenants.get(tenant_id) is None:
        raise ApiError(404, "not_found", "tenant not found")
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
    m = r.json()
    band, recommendations, _, _ = assess(m)
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
