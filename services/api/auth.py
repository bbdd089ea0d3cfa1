"""Who is calling: the admin (configured token) or a tenant (API key). ``X-API-Token`` or
``Authorization: Bearer``. Tenant keys are checked against the hashed keys of the config view."""

from __future__ import annotations

import hmac
import time

from fastapi import Request

from services.api.commands import Actor
from services.api.errors import ApiError
from services.api.state import ApiState
from services.common.apikeys import parse_api_key, verify


def _token(request: Request) -> str | None:
    token = request.headers.get("x-api-token")
    if token:
        return token.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(request: Request, state: ApiState) -> Actor:
    token = _token(request)
    if not token:
        raise ApiError(401, "authentication_required", "missing X-API-Token or Authorization: Bearer header")
    if hmac.compare_digest(token.encode(), state.admin_token.encode()):
        return Actor("admin")
    parsed = parse_api_key(token)
    if parsed:
        key_id, secret = parsed
        record = state.apikeys.get(key_id)
        if record and verify(secret, record["key_hash"], state.pepper):
            expires = record.get("expires_ts")
            if expires is not None and expires <= int(time.time() * 1000):
                raise ApiError(401, "api_key_expired", "the API key has expired")
            tenant = state.tenants.get(record["tenant_id"])
            if tenant is None:
                raise ApiError(401, "invalid_token", "invalid API token")
            return Actor("tenant", record["tenant_id"], key_id)
    raise ApiError(401, "invalid_token", "invalid API token")


def require_admin(actor: Actor) -> None:
    if actor.kind != "admin":
        raise ApiError(403, "admin_required", "this route needs the admin token")


def scope_tenant(actor: Actor, tenant_id: str | None) -> str | None:
    """The tenant a call acts on. A tenant key may only name its own tenant (defaults to it)."""
    if actor.kind == "admin":
        return tenant_id
    if tenant_id is not None and tenant_id != actor.tenant_id:
        raise ApiError(401, "tenant_mismatch", "this API key is not valid for that tenant")
    return actor.tenant_id
