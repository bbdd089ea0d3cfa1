"""The provider API's own envelope and error shape (seed: smtp-provider-api-reference).

Success: ``{"success": true, "data": {...}}``. Errors: ``{"success": false, "data": ["<message>", ...]}``
with the seed's wording ("The user id field is required."): 422 validation, 401 token, 403
"Wrong user id", 404 unknown or another user's object, 429 throttled, 503 event log unavailable.

Every provider route is made with :class:`ProviderRoute` (use :func:`provider_router`), which turns
:class:`ProviderError`, FastAPI's own request validation errors and the command log's
``BrokerUnavailable`` into this shape, so the surface never answers with the tenant API's
``{"ok": false, "error": ...}`` shape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from services.api.commands import BrokerUnavailable
from services.api.errors import RETRY_AFTER_S, ApiError

log = logging.getLogger("postbus.api.provider")


def ok(data: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data}, status_code=status)


class ProviderError(Exception):
    """An error of the provider surface: ``{"success": false, "data": [messages]}``."""

    def __init__(self, status: int, *messages: str, headers: dict[str, str] | None = None) -> None:
        super().__init__("; ".join(messages))
        self.status = status
        self.messages = list(messages) or ["Error."]
        self.headers = headers

    def response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse({"success": False, "data": self.messages}, status_code=self.status,
                            headers=headers or None)


def fail(status: int, *messages: str) -> JSONResponse:
    return ProviderError(status, *messages).response()


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "members", 3, "email")`` -> ``members.3.email``; the first part (body/query) is dropped."""
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts).replace("_", " ")


def validation_messages(errors: list[dict[str, Any]]) -> list[str]:
    """Pydantic/FastAPI errors in the seed's wording."""
    out: list[str] = []
    for e in errors:
        kind = str(e.get("type", ""))
        loc = tuple(e.get("loc", ()))
        name = _field(loc)
        if kind == "json_invalid":
            msg = "The request body must be valid JSON."
        elif kind == "missing":
            msg = f"The {name} field is required."
        elif kind.startswith("int") or kind == "int_type":
            msg = f"The {name} must be an integer."
        elif kind.startswith("bool"):
            msg = f"The {name} field must be true or false."
        elif kind in ("string_type", "string_unicode"):
            msg = f"The {name} must be a string."
        elif kind == "string_too_long":
            msg = f"The {name} may not be greater than {e.get('ctx', {}).get('max_length')} characters."
        elif kind == "string_too_short":
            msg = f"The {name} field is required."
        elif kind == "too_long":
            msg = f"The {name} may not have more than {e.get('ctx', {}).get('max_length')} items."
        elif kind in ("list_type", "dict_type", "model_type", "model_attributes_type"):
            msg = f"The {name} field has the wrong type."
        elif kind == "value_error":
            text = str(e.get("msg", "")).removeprefix("Value error, ")
            msg = text if text.endswith(".") else f"The {name} is invalid: {text}."
        elif name in ("", "body"):
            msg = "The request body must be a JSON object."
        else:
            msg = f"The {name} is invalid."
        if msg not in out:
            out.append(msg)
    return out or ["The given data was invalid."]


class ProviderRoute(APIRoute):
    """Renders every error of a provider route in the provider shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ProviderError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return fail(422, *validation_messages(list(exc.errors())))
            except BrokerUnavailable:
                return ProviderError(503, "The service is temporarily unavailable, please retry.",
                                     headers={"Retry-After": str(RETRY_AFTER_S)}).response()
            except ApiError as exc:  # a shared helper (e.g. of the domain API) refused: same status, our shape
                return fail(exc.status, exc.message)

        return route


def provider_router(**kwargs: Any) -> APIRouter:
    """An APIRouter whose routes answer in the provider shape (campaign modules use it too)."""
    return APIRouter(route_class=ProviderRoute, **kwargs)


# OpenAPI: the error bodies of the provider surface
ERROR_MODEL = {"content": {"application/json": {
    "example": {"success": False, "data": ["The user id field is required."]}}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "missing, invalid or expired token", 403: "Wrong user id", 404: "unknown or another user's object",
            422: "validation error", 429: "too many attempts", 503: "event log unavailable, retry"}
    return {c: {"description": text.get(c, "error"), **ERROR_MODEL} for c in codes}
