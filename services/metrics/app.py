"""Internal query API of the metrics service. Binds to 127.0.0.1 by default (``metrics_host``), and
every route but ``GET /health`` needs the internal service credential (``POSTBUS_INTERNAL_TOKEN``, as
``Authorization: Bearer`` or ``X-Internal-Token``; 401 ``internal_auth_required`` otherwise; see
common/internal_auth.py). Operators replay through the API's admin route ``POST /admin/replay/metrics``.

    GET  /health                                   liveness + ingest connection (public)
    GET  /metrics                                  Prometheus text
    GET  /internal/tenants/{tenant_id}/metrics     distinct messages per outcome over ?window=24h|7d|...
                                                   (&group_by=domain|provider: per sending domain / provider;
                                                   &group_by=campaign: per provider-API campaign)
    GET  /internal/tenants/{tenant_id}/campaigns      counts per campaign (all time), ?ids=1,2
    GET  /internal/bi/metrics                      BI aggregates: totals, series, top groups (bi.py)
    GET  /internal/tenants/{tenant_id}/messages/{message_id}/events   one message's event history
    POST /internal/sent-ids                        which of these ids were already sent
    GET  /internal/messages                        message projection of one tenant (GET /messages)
    POST /internal/messages/lookup                 pending / final / other-tenant ids (delete-messages)
    POST /internal/messages/cleanup                fully reported final messages older than N s
    GET  /internal/inbound/resolve                 the message an inbound report is about (tenant+id or pk)
    GET  /internal/inbound/pec-overdue             PEC messages without any receipt (pec_timeout scan)
    GET  /internal/ingest-status                   per-partition next offset, caught_up, rows
    POST /internal/ingest/wait                     wait until given offsets are loaded (read-your-writes)
    POST /internal/replay                          drop tables, re-read the events topic from 0
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.internal_auth import InternalAuthMiddleware, load_internal_token
from services.common.settings import Settings
from services.common.topics import EVENTS
from services.metrics import analytics, bi, campaigns, inbound_lookup, ingest_wait
from services.metrics.ingest import Ingestor
from services.metrics.store import AsyncStore, Counts, Store, parse_window

log = logging.getLogger("postbus.metrics.app")

MAX_IDS = 1000
REQUESTS = PromCounter("postbus_metrics_requests_total",
                       "Requests answered by the metrics service (after authentication), by route and status",
                       ["route", "status"])


class MetricsSettings(Settings):
    """Settings of this service only (env POSTBUS_METRICS_*), on top of the shared ones."""

    metrics_retention_days: int = Field(400, ge=1)
    metrics_ingest: bool = True  # false: query API only (tests, read replicas)
    # ingest batches (ingest.py): written at this many rows or this long after their first record;
    # a read-your-writes waiter flushes the current batch at once
    metrics_flush_rows: int = Field(20000, ge=1)
    metrics_flush_ms: int = Field(1000, ge=0, le=60000)


class SentIdsRequest(BaseModel):
    tenant_id: str = Field(min_length=1)
    ids: list[str] = Field(max_length=MAX_IDS)


class LookupRequest(BaseModel):
    tenant_id: str = Field(min_length=1)
    ids: list[str] = Field(max_length=MAX_IDS)


class CleanupRequest(BaseModel):
    tenant_id: str = Field(min_length=1)
    older_than_seconds: float = Field(ge=0)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


STORE_RETRY_S = 0.5  # first wait before opening ClickHouse again at start-up (doubling to 10 s)


async def _open_store(settings: MetricsSettings) -> Store:
    """Open the store and create its tables, retrying while ClickHouse does not answer (a server
    outage at start-up): the service waits for it instead of exiting into a restart loop."""
    backoff = STORE_RETRY_S
    while True:
        try:
            store = await asyncio.to_thread(Store, settings.clickhouse, settings.metrics_retention_days)
            await asyncio.to_thread(store.create)
            return store
        except Exception as exc:  # the type only: a driver message may carry the server's address details
            log.warning("ClickHouse not reachable at start-up, retrying",
                        extra={"clickhouse": _safe_dsn(settings.clickhouse), "error": type(exc).__name__,
                               "retry_s": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


def create_app(settings: MetricsSettings, store: Store | None = None) -> FastAPI:
    """``store`` lets tests inject an opened store; otherwise the DSN of the settings is opened.
    Raises MissingInternalToken outside dev mode without POSTBUS_INTERNAL_TOKEN."""
    token = load_internal_token(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is None:
            astore = AsyncStore(await _open_store(settings))
        else:
            astore = AsyncStore(store)
            await astore.create()
        ingestor: Ingestor | None = None
        if settings.metrics_ingest:
            ingestor = Ingestor(
                astore, settings.kafka_bootstrap,
                batch_rows=settings.metrics_batch_rows, batch_ms=settings.metrics_batch_ms,
                flush_rows=settings.metrics_flush_rows, flush_ms=settings.metrics_flush_ms,
            )
            await ingestor.start()
        app.state.store, app.state.ingestor = astore, ingestor
        log.info("metrics service ready", extra={"clickhouse": _safe_dsn(settings.clickhouse)})
        try:
            yield
        finally:
            if ingestor is not None:
                await ingestor.stop()
            if store is None:  # an injected store belongs to the caller
                await astore.close()
            log.info("metrics service stopped")

    app = FastAPI(title="postbus-metrics (internal)", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        response: Response = await call_next(request)
        REQUESTS.labels(getattr(request.scope.get("route"), "path", "unmatched"), str(response.status_code)).inc()
        return response

    # added last = outermost: an unauthenticated request never reaches routing, validation, the
    # store or the request counter
    app.add_middleware(InternalAuthMiddleware, token=token)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, "VALIDATION_ERROR", f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "RESOURCE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "ERROR")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("query failed", extra={"error": str(exc)})
        # a ClickHouse outage: the ingest keeps its stored offsets and catches up when it returns
        return _error(503, "STORE_UNAVAILABLE", "metrics store query failed", {"Retry-After": "5"})

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        ing: Ingestor | None = request.app.state.ingestor
        return {
            "ok": True,
            "service": "metrics",
            "ingest": None if ing is None else {"connected": ing.connected, "replaying": ing.replaying},
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/internal/tenants/{tenant_id}/metrics")
    async def tenant_metrics(request: Request, tenant_id: str, window: str = "24h",
                             group_by: Literal["domain", "provider", "campaign"] | None = None) -> Any:
        try:
            hours = parse_window(window)
        except ValueError as exc:
            return _error(422, "VALIDATION_ERROR", str(exc))
        if group_by == "campaign":  # provider-API campaigns, by message id prefix (campaigns.py)
            astore_c: AsyncStore = request.app.state.store
            from_ts, to_ts = analytics.window_bounds(hours)
            per = await astore_c.run(campaigns.campaign_counts, astore_c.sync, tenant_id, None, from_ts)
            return {"window": window, "from_ts": from_ts, "to_ts": to_ts, "group_by": group_by,
                    "groups": [{"key": str(cid), **values} for cid, values in sorted(per.items())]}
        if group_by is not None:  # per sending domain / mailbox provider, from the hourly aggregates
            astore: AsyncStore = request.app.state.store
            from_ts, to_ts, groups = await astore.run(analytics.grouped_counts, astore.sync, tenant_id, hours,
                                                      group_by)
            return {"window": window, "from_ts": from_ts, "to_ts": to_ts, "group_by": group_by,
                    "groups": [{"key": key, **Counts(values).as_dict()} for key, values in sorted(groups.items())]}
        to_ts = int(time.time() * 1000)
        from_ts = to_ts - hours * 3_600_000
        counts = await request.app.state.store.tenant_counts(tenant_id, from_ts, to_ts)
        return {"window": window, "from_ts": from_ts, "to_ts": to_ts, **counts.as_dict()}

    @app.get("/internal/bi/metrics")
    async def bi_metrics(request: Request, from_ts: int, to_ts: int, bucket: str = "hour",
                         group_by: str | None = None, top: int = bi.DEFAULT_TOP,
                         tenant_id: str | None = None, distinct: bool = True) -> Any:
        """Cross-tenant (or one tenant's) aggregates from the BI views; the API checks who may ask."""
        q = bi.Query(from_ts, to_ts, bucket, group_by, top, tenant_id, distinct)
        try:
            bi.validate(q)
        except ValueError as exc:
            return _error(422, "VALIDATION_ERROR", str(exc))
        astore_b: AsyncStore = request.app.state.store
        return await astore_b.run(bi.run, astore_b.sync, q)

    @app.get("/internal/tenants/{tenant_id}/campaigns")
    async def campaign_metrics(request: Request, tenant_id: str, ids: str = "") -> Any:
        """Counts of the tenant's campaigns (all time): ``ids`` = comma-separated campaign ids."""
        try:
            wanted = [int(i) for i in ids.split(",") if i.strip()][:campaigns.MAX_IDS]
        except ValueError:
            return _error(422, "VALIDATION_ERROR", "ids must be comma-separated integers")
        astore: AsyncStore = request.app.state.store
        per = await astore.run(campaigns.campaign_counts, astore.sync, tenant_id, wanted if ids.strip() else None)
        return {"campaigns": {str(cid): values for cid, values in sorted(per.items())}}

    @app.get("/internal/tenants/{tenant_id}/messages/{message_id}/events")
    async def message_events(request: Request, tenant_id: str, message_id: str) -> dict[str, Any]:
        events = await request.app.state.store.message_events(tenant_id, message_id)
        return {"tenant_id": tenant_id, "message_id": message_id, "events": events}

    @app.get("/internal/counters")
    async def counters(request: Request) -> dict[str, Any]:
        return await request.app.state.store.counters()  # type: ignore[no-any-return]

    @app.post("/internal/sent-ids")
    async def sent_ids(request: Request, body: SentIdsRequest) -> dict[str, list[str]]:
        return {"sent": await request.app.state.store.sent_ids(body.tenant_id, body.ids)}

    @app.get("/internal/messages")
    async def messages(
        request: Request,
        tenant_id: str = Query(min_length=1),
        active_only: bool = False,
        include_history: bool = False,
        limit: int = Query(1000, ge=1, le=100_000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        return await request.app.state.store.list_messages(
            tenant_id, active_only=active_only, include_history=include_history, limit=limit, offset=offset)

    @app.post("/internal/messages/lookup")
    async def lookup(request: Request, body: LookupRequest) -> dict[str, list[str]]:
        return await request.app.state.store.lookup(body.tenant_id, body.ids)

    @app.post("/internal/messages/cleanup")
    async def cleanup(request: Request, body: CleanupRequest) -> dict[str, list[str]]:
        return {"ids": await request.app.state.store.cleanup_ids(body.tenant_id, body.older_than_seconds)}

    @app.get("/internal/inbound/resolve")
    async def inbound_resolve(request: Request, tenant_id: str | None = None, id: str | None = None,
                              pk: str | None = None) -> Any:
        astore: AsyncStore = request.app.state.store
        found = await astore.run(inbound_lookup.resolve, astore.sync, tenant_id, id, pk)
        ing: Ingestor | None = request.app.state.ingestor
        if found is None and ing is not None:
            # a report can come right after the send: write the batch already read, then look again
            await ing.settle()
            found = await astore.run(inbound_lookup.resolve, astore.sync, tenant_id, id, pk)
        return found if found is not None else _error(404, "NOT_FOUND", "no such message")

    @app.get("/internal/inbound/pec-overdue")
    async def inbound_pec_overdue(request: Request, domains: str = Query(""), sent_before_ms: int = Query(ge=0),
                                  sent_after_ms: int = Query(0, ge=0),
                                  limit: int = Query(1000, ge=1, le=10000)) -> dict[str, Any]:
        names = [d.strip() for d in domains.split(",") if d.strip()]
        astore: AsyncStore = request.app.state.store
        rows = await astore.run(inbound_lookup.pec_overdue, astore.sync, names, sent_before_ms, sent_after_ms, limit)
        return {"messages": rows}

    @app.get("/internal/ingest-status")
    async def ingest_status(request: Request) -> dict[str, Any]:
        ing: Ingestor | None = request.app.state.ingestor
        astore: AsyncStore = request.app.state.store
        rows = await astore.row_count()
        if ing is None:
            stored = await astore.load_offsets(EVENTS)
            return {"partitions": {str(p): o for p, o in sorted(stored.items())}, "caught_up": False,
                    "rows": rows, "replaying": False, "connected": False}
        return {**(await ing.status()), "rows": rows}

    @app.post("/internal/ingest/wait")
    async def ingest_wait_route(request: Request, body: ingest_wait.WaitRequest) -> Any:
        return await ingest_wait.wait(request.app.state.ingestor, body)

    @app.post("/internal/replay", status_code=202)
    async def replay(request: Request) -> dict[str, Any]:
        ing: Ingestor | None = request.app.state.ingestor
        log.info("replay requested", extra={"requested_by": request.headers.get("x-postbus-actor", "internal")})
        if ing is None:
            await request.app.state.store.reset()
        else:
            await ing.request_replay()
        return {"ok": True}

    return app


def _safe_dsn(dsn: str) -> str:
    """Never log credentials of an http(s)://user:password@host DSN."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return dsn
