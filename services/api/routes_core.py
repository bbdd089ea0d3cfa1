"""Public and core routes: health, Prometheus, run-now."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.api.auth import authenticate
from services.api.deps import state_of
from services.api.gmp_metrics import check_access, gmp_text
from services.api.models import RunNowOut

router = APIRouter()


@router.get("/health", tags=["public"])
async def health(request: Request) -> dict[str, object]:
    st = state_of(request)
    ready = st.tenants.ready.is_set() and st.accounts.ready.is_set() and st.apikeys.ready.is_set()
    return {"status": "ok" if ready else "starting", "ok": ready}


@router.get("/metrics", tags=["public"], response_class=Response, summary="Prometheus metrics (text format)")
async def metrics(request: Request) -> Response:
    st = state_of(request)
    check_access(request, st)  # public unless POSTBUS_METRICS_REQUIRE_ADMIN
    body = generate_latest().decode() + await gmp_text(st)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/commands/run-now", tags=["commands"], response_model=RunNowOut)
async def run_now(request: Request) -> RunNowOut:
    st = state_of(request)
    actor = authenticate(request, st)
    tenant = actor.tenant_id if actor.kind == "tenant" else None
    # a tenant key overrides its own Do-Not-Disturb; the admin wakes everyone and respects DND
    await st.writer.append("run-now", tenant, actor, "POST /commands/run-now", "RunNow",
                           {"tenant_id": tenant, "override_dnd": tenant is not None})
    return RunNowOut(scope=tenant or "all")
