"""Provider API (seed: smtp-provider-api-reference, PRODUCT.md section 6): users, tokens, domains,
senders, templates, mailing lists and members, welcome mail; campaigns in ``campaigns.py``.

``router`` is included once by services/api/app.py. The token route lives under ``/api``, the
protected routes under ``/api/v1`` (Bearer token + ``user_id``), the user administration under the
mail-proxy API's ``/tenant/{id}/users`` (admin or the tenant's key, mail-proxy error shape).
See docs/provider.md."""

from __future__ import annotations

import importlib

from fastapi import APIRouter

from services.api.provider import domains, lists, senders, templates, tokens, users, welcome

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

__all__ = ["router"]
