"""Tenants and SMTP accounts: validated, then appended as a command plus its compacted config record."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from services.api.auth import authenticate, require_admin, scope_tenant
from services.api.commands import ConfigRecord
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import AccountIn, Ok, TenantCreated, TenantIn
from services.api.state import account_key
from services.common.apikeys import new_api_key
from services.common.topics import CONFIG_ACCOUNTS, CONFIG_APIKEYS, CONFIG_TENANTS

router = APIRouter()


def _client_auth(body: TenantIn, st_box, previous: dict | None) -> tuple[str, str | None, str | None]:
    """(method, user, encrypted secret). Omitting client_auth on an update keeps the stored one."""
    if body.client_auth is None:
        if previous:
            return (previous["client_auth_method"], previous.get("client_auth_user"),
                    previous.get("client_auth_secret_enc"))
        return "none", None, None
    auth = body.client_auth
    if auth.method == "bearer":
        if not auth.token:
            raise ApiError(400, "invalid_client_auth", "client_auth.method=bearer needs a token")
        return "bearer", None, st_box.encrypt(auth.token)
    if auth.method == "basic":
        if not auth.user or auth.password is None:
            raise ApiError(400, "invalid_client_auth", "client_auth.method=basic needs user and password")
        return "basic", auth.user, st_box.encrypt(auth.password)
    return "none", None, None


@router.post("/tenant", tags=["tenants"], response_model=TenantCreated)
async def create_tenant(body: TenantIn, request: Request) -> TenantCreated:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    now = int(time.time() * 1000)
    previous = st.tenants.get(body.id)
    method, user, secret_enc = _client_auth(body, st.box, previous)
    tenant = {
        "id": body.id,
        "name": body.name,
        "active": body.active,
        "client_base_url": str(body.client_base_url).rstrip("/") if body.client_base_url else None,
        "client_sync_path": body.client_sync_path,
        "client_auth_method": method,
        "client_auth_user": user,
        "client_auth_secret_enc": secret_enc,
        "client_attachment_path": body.client_attachment_path,
        "rate_limit_hourly": body.rate_limits.hourly if body.rate_limits else None,
        "rate_limit_daily": body.rate_limits.daily if body.rate_limits else None,
        "large_file_config_json": json.dumps(body.large_file_config) if body.large_file_config else None,
        "created_ts": previous["created_ts"] if previous else now,
        "updated_ts": now,
    }
    records = [ConfigRecord(CONFIG_TENANTS, body.id, "Tenant", tenant)]
    api_key = None
    if previous is None:
        api_key, key_id, key_hash = new_api_key(st.pepper)
        records.append(ConfigRecord(CONFIG_APIKEYS, key_id, "ApiKey", {
            "key_id": key_id, "tenant_id": body.id, "key_hash": key_hash, "created_ts": now, "expires_ts": None,
        }))
    offsets = await st.writer.append_config(
        "tenant.create" if previous is None else "tenant.update", body.id, actor, "POST /tenant",
        "Tenant", tenant, records,
    )
    await st.wait_visible(offsets)
    return TenantCreated(tenant_id=body.id, created=previous is None, api_key=api_key)


@router.post("/account", tags=["accounts"], response_model=Ok)
async def upsert_account(body: AccountIn, request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    tenant_id = scope_tenant(actor, body.tenant_id)
    if not tenant_id:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    if st.tenants.get(tenant_id) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tenant_id!r} does not exist")
    now = int(time.time() * 1000)
    key = account_key(tenant_id, body.id)
    previous = st.accounts.get(key)
    password_enc = st.box.encrypt(body.password) if body.password is not None else (
        previous.get("password_enc") if previous else None)
    account = {
        "id": body.id,
        "tenant_id": tenant_id,
        "host": body.host,
        "port": body.port,
        "user": body.user,
        "password_enc": password_enc,
        "use_tls": body.use_tls,
        "batch_size": body.batch_size,
        "limit_per_minute": body.limit_per_minute,
        "limit_per_hour": body.limit_per_hour,
        "limit_per_day": body.limit_per_day,
        "limit_behavior": body.limit_behavior,
        "created_ts": previous["created_ts"] if previous else now,
        "updated_ts": now,
    }
    offsets = await st.writer.append_config(
        "account.upsert", tenant_id, actor, "POST /account", "Account", account,
        [ConfigRecord(CONFIG_ACCOUNTS, key, "Account", account)],
    )
    await st.wait_visible(offsets)
    return Ok()
