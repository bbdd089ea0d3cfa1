"""Tenants and SMTP accounts: validated, then appended as a command plus its compacted config record."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from services.api import field_policy, url_checks
from services.api.auth import authenticate, require_admin, scope_tenant
from services.api.commands import ConfigRecord
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import AccountIn, ClientAuth, Ok, TenantCreated, TenantIn, TrackingConfig, errors
from services.api.state import account_key
from services.common.apikeys import new_api_key
from services.common.crypto import SecretBox
from services.common.netpolicy import NetPolicy
from services.common.topics import CONFIG_ACCOUNTS, CONFIG_APIKEYS, CONFIG_TENANTS

router = APIRouter()


def client_auth_fields(auth: ClientAuth | None, box: SecretBox) -> tuple[str, str | None, str | None]:
    """(method, user, encrypted secret) of a client_auth object; secrets are encrypted before any topic."""
    if auth is None or auth.method == "none":
        return "none", None, None
    if auth.method == "bearer":
        if not auth.token:
            raise ApiError(400, "invalid_client_auth", "client_auth.method=bearer needs a token")
        return "bearer", None, box.encrypt(auth.token)
    if not auth.user or auth.password is None:
        raise ApiError(400, "invalid_client_auth", "client_auth.method=basic needs user and password")
    return "basic", auth.user, box.encrypt(auth.password)


def _client_auth(body: TenantIn, box: SecretBox, previous: dict | None) -> tuple[str, str | None, str | None]:
    """Omitting client_auth on a re-POST keeps the stored one."""
    if body.client_auth is None and previous:
        return (previous["client_auth_method"], previous.get("client_auth_user"),
                previous.get("client_auth_secret_enc"))
    return client_auth_fields(body.client_auth, box)


def key_expiry(expires_at: int | None, expires_in_days: float | None, now_ms: int) -> int | None:
    """API key expiry in epoch ms from ``expires_at`` (unix seconds) or ``expires_in_days``."""
    if expires_at is not None and expires_in_days is not None:
        raise ApiError(400, "invalid_expiry", "give expires_at or expires_in_days, not both")
    if expires_in_days is not None:
        return now_ms + int(expires_in_days * 86_400_000)
    if expires_at is not None:
        if expires_at * 1000 <= now_ms:
            raise ApiError(400, "invalid_expiry", "expires_at is in the past")
        if expires_at > 253402300799:  # year 9999
            raise ApiError(400, "invalid_expiry", "expires_at is too far in the future")
        return expires_at * 1000
    return None


@router.post("/tenant", tags=["tenants"], response_model=TenantCreated,
             summary="Create (or update) a tenant (admin); the API key is returned once, on creation",
             responses=errors(400, 401, 403, 422))
async def create_tenant(body: TenantIn, request: Request) -> TenantCreated:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    url_checks.check_tenant_fields(body, body.id, st.settings)  # 422 (network policy, storage roots)
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
        "large_file_config_json": json.dumps(body.large_file_config_dict()) if body.large_file_config else None,
        **(body.tracking or TrackingConfig()).record_fields(),
        **(body.default_from.record_fields() if body.default_from
           else {"default_from_name": None, "default_from_email": None}),
        "created_ts": previous["created_ts"] if previous else now,
        "updated_ts": now,
    }
    records = [ConfigRecord(CONFIG_TENANTS, body.id, "Tenant", tenant)]
    api_key = None
    if previous is None:
        expires_ts = key_expiry(body.expires_at, body.expires_in_days, now)
        api_key, key_id, key_hash = new_api_key(st.pepper)
        records.append(ConfigRecord(CONFIG_APIKEYS, key_id, "ApiKey", {
            "key_id": key_id, "tenant_id": body.id, "key_hash": key_hash, "created_ts": now,
            "expires_ts": expires_ts,
        }))
    offsets = await st.writer.append_config(
        "tenant.create" if previous is None else "tenant.update", body.id, actor, "POST /tenant",
        "Tenant", tenant, records,
    )
    await st.wait_visible(offsets)
    return TenantCreated(tenant_id=body.id, created=previous is None, api_key=api_key)


@router.post("/account", tags=["accounts"], response_model=Ok, summary="Add or update an SMTP account",
             responses=errors(400, 401, 404, 422))
async def upsert_account(body: AccountIn, request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    field_policy.check_write("account", actor, body)
    tenant_id = scope_tenant(actor, body.tenant_id)
    if not tenant_id:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    if st.tenants.get(tenant_id) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tenant_id!r} does not exist")
    refusal = NetPolicy.from_settings(st.settings).host_refusal(body.host)  # the sender checks again
    if refusal:
        raise ApiError(422, "host_not_allowed", f"host {refusal}")
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
        "max_connections": body.max_connections,
        "tls_verify": body.tls_verify,
        "ca_bundle_pem": body.ca_bundle_pem,
        "allow_insecure_auth": body.allow_insecure_auth,
        "created_ts": previous["created_ts"] if previous else now,
        "updated_ts": now,
    }
    offsets = await st.writer.append_config(
        "account.upsert", tenant_id, actor, "POST /account", "Account", account,
        [ConfigRecord(CONFIG_ACCOUNTS, key, "Account", account)],
    )
    await st.wait_visible(offsets)
    return Ok()
