"""FastAPI gateway. Writes append commands to Kafka; reads come from config views and the metrics service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram

from services.api import (
    provider,
    routes_admin,
    routes_bi,
    routes_config,
    routes_core,
    routes_dashboard,
    routes_domains,
    routes_files,
    routes_lifecycle,
    routes_messages,
    routes_messages_read,
    routes_smtp,
    routes_suppression,
    routes_tenants,
    routes_tracking,
    routes_webhooks,
)
from services.api.body_limit import BodyLimit
from services.api.errors import install_error_handlers
from services.api.state import ApiState
from services.common.settings import Settings, get_settings

REQUESTS = Counter("postbus_api_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("postbus_api_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ApiState.build(settings)
        await state.start()
        app.state.postbus = state
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="Postbus",
        version="0.1.0",
        description="Multi-tenant email dispatch: mail-proxy API, tenant SMTP API. "
        "Authenticate with `X-API-Token: <token>` or `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (routes_core, routes_config, routes_tenants, routes_messages, routes_lifecycle,
                   routes_messages_read, routes_admin, routes_smtp, routes_domains, routes_files,
                   routes_suppression, routes_tracking, routes_webhooks):
        app.include_router(module.router)
    app.include_router(routes_bi.router)  # BI aggregates: GET /api/v1/bi/metrics (docs/bi.md)
    app.include_router(provider.router)  # provider API: /api/smtp-*, /api/v1/smtp-*, /tenant/{id}/users
    app.include_router(routes_dashboard.router)  # GET /dashboard: the BI page (docs/dashboard.md)

    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        LATENCY.labels(name).observe(time.perf_counter() - start)
        REQUESTS.labels(name, str(response.status_code)).inc()
        return response

    # added last, so outermost: request bodies are capped before routing, authentication or parsing
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes,
                       small_max_bytes=settings.api_max_webhook_body_bytes)
    return app
