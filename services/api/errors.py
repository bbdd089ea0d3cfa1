"""One JSON error shape for every 4xx of the mail-proxy surface:
``{"ok": false, "error": {"code": "<stable_code>", "message": "<human text>", "details": ...}}``.
The tenant SMTP surface (/api/v1/...) uses the seed's envelope ``{"success": false, "error": {...}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("postbus.api")

SMTP_API_PREFIX = "/api/v1/"
RETRY_AFTER_S = 5  # Retry-After of a 503 while the broker is unavailable

# HTTP status -> code used on the tenant SMTP surface (seed: shared error standard)
_SEED_CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_REQUIRED",
    403: "INSUFFICIENT_PERMISSIONS",
    404: "RESOURCE_NOT_FOUND",
    422: "VALIDATION_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.extra = extra or {}


def error_body(request: Request, status: int, code: str, message: str, details: Any = None) -> dict[str, Any]:
    if request.url.path.startswith(SMTP_API_PREFIX):
        err: dict[str, Any] = {"code": _SEED_CODES.get(status, code.upper()), "message": message}
        if details is not None:
            err["details"] = details
        return {"success": False, "error": err}
    err = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"ok": False, "error": err}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = error_body(request, exc.status, exc.code, exc.message, exc.details)
        body.update(exc.extra)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(
            error_body(request, 422, "validation_error", "request is not valid", details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            error_body(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
        )

    from services.api.commands import BrokerUnavailable  # here: commands imports nothing of the routes

    @app.exception_handler(BrokerUnavailable)
    async def _broker(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse(
            error_body(request, 503, "broker_unavailable",
                       f"{exc}: the write is not known to be applied; retry later (resubmitting is safe)"),
            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(
            error_body(request, 500, "internal_error", "internal error; the request was not applied"),
            status_code=500,
        )
