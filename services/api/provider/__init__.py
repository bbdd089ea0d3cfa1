"""Provider API (seed: smtp-provider-api-reference, PRODUCT.md section 6): users, tokens, domains,
senders, templates, mailing lists and members, welcome mail; campaigns in ``campaigns.py``.

``router`` is included once by services/api/app.py. The token route lives under ``/api``, the
protected routes under ``/api/v1`` (Bearer token + ``user_id``), the user administration under the
mail-proxy API's ``/tenant/{id}/users`` (admin or the tenant's key, mail-proxy error shape).
See docs/provider.md."""

from __future__ import annotations

import importlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.api.provider import domains, lists, senders, templates, tokens, users, welcome
from services.api.provider.envelope import fail

router = APIRouter()
router.include_router(users.router)
for _module in (tokens, domains, senders, templates, lists, welcome):
    router.include_router(_module.router)

try:  # campaigns (services/api/provider/campaigns.py) are built by another module owner
    _campaigns = importlib.import_module("services.api.provider.campaigns")
except ModuleNotFoundError as _exc:  # only its absence is tolerated, never an error inside it
    if _exc.name != "services.api.provider.campaigns":
        raise
else:
    router.include_router(_campaigns.router)

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@router.api_route("/api/smtp-{rest:path}", methods=_ALL_METHODS, include_in_schema=False)
@router.api_route("/api/v1/smtp-{rest:path}", methods=_ALL_METHODS, include_in_schema=False)
async def _unmatched(request: Request, rest: str) -> JSONResponse:
    """Added last: an unknown provider path (404) or another method of a provider path (405) answers
    in the provider shape too, not the tenant SMTP API's."""
    ops = request.app.openapi()["paths"].get(request.url.path, {})  # generated once, then cached by FastAPI
    methods = sorted(m.upper() for m in ops if m in ("get", "post", "put", "patch", "delete"))
    if methods:
        response = fail(405, f"The {request.method} method is not supported for this route. "
                             f"Supported methods: {', '.join(methods)}.")
        response.headers["Allow"] = ", ".join(methods)
        return response
    return fail(404, "Not found.")


__all__ = ["router"]
