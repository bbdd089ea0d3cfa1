"""Who may read the tenant SMTP API (seed: tenant-smtp-rest-api-contract.md §1):

- a tenant API key, for its own tenant only;
- the admin token (cross-tenant);
- an internal support principal (configured, token stored as SHA-256) holding the scopes the
  endpoint needs; every support access is written to the audit log (a ``support.access`` command
  on ``postbus.commands``) before the data is returned."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass

from fastapi import Request

from services.api.auth import _token, authenticate
from services.api.commands import Actor
from services.api.errors import ApiError
from services.api.state import ApiState

log = logging.getLogger("postbus.api.smtp_access")


@dataclass(frozen=True)
class SupportPrincipal:
    name: str
    token_sha256: str
    scopes: frozenset[str]


def load_principals(raw: str) -> list[SupportPrincipal]:
    try:
        items = json.loads(raw or "[]")
        return [SupportPrincipal(i["name"], i["token_sha256"].lower(), frozenset(i.get("scopes", [])))
                for i in items]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RuntimeError("POSTBUS_SUPPORT_PRINCIPALS_JSON is not a valid list of principals") from exc


def _support(request: Request, st: ApiState) -> SupportPrincipal | None:
    token = _token(request)
    if not token:
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    for p in load_principals(st.settings.support_principals_json):
        if hmac.compare_digest(digest, p.token_sha256):
            return p
    return None


async def authorize(request: Request, st: ApiState, tenant_id: str, scopes: set[str]) -> Actor:
    support = _support(request, st)
    if support is not None:
        missing = scopes - support.scopes
        if missing:
            raise ApiError(403, "insufficient_permissions", f"missing scopes: {', '.join(sorted(missing))}")
        if st.tenants.get(tenant_id) is None:
            raise ApiError(404, "not_found", "tenant not found")
        actor = Actor("support", tenant_id, support.name)
        await st.writer.append("support.access", tenant_id, actor, f"GET {request.url.path}", "SupportAccess",
                               {"principal": support.name, "tenant_id": tenant_id, "route": request.url.path,
                                "scopes": sorted(scopes)})
        log.info("support access", extra={"principal": support.name, "tenant_id": tenant_id,
                                          "route": request.url.path})
        return actor
    actor = authenticate(request, st)
    if actor.kind == "tenant" and actor.tenant_id != tenant_id:
        raise ApiError(403, "insufficient_permissions", "this token is not valid for that tenant")
    if st.tenants.get(tenant_id) is None:
        raise ApiError(404, "not_found", "tenant not found")
    return actor
