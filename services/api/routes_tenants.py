"""Tenants (read, update, delete, list), API keys (rotate, revoke), accounts (list, delete).

Every write is one Kafka transaction: the command on ``postbus.commands`` plus its config records
(upserts or tombstones), so the audit log and the projections never disagree."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request

from services.api import field_policy, url_checks
from services.api.auth import authenticate, require_admin, scope_tenant
from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import (
    AccountList,
    AccountOut,
    ApiKeyIn,
    ApiKeyOut,
    ClientAuthOut,
    DefaultFrom,
    Ok,
    RateLimits,
    TenantList,
    TenantOut,
    TenantUpdate,
    TrackingConfig,
    errors,
)
from services.api.routes_config import client_auth_fields, key_expiry
from services.api.state import ApiState, account_key
from services.common.apikeys import new_api_key
from services.common.topics import CONFIG_ACCOUNTS, CONFIG_APIKEYS, CONFIG_SUSPENSIONS, CONFIG_TENANTS

router = APIRouter()

# topics the API follows with a view (read-your-writes waits only on those)
_VIEWED = (CONFIG_TENANTS, CONFIG_ACCOUNTS, CONFIG_APIKEYS)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tenant_out(t: dict[str, Any]) -> TenantOut:
    lfc = t.get("large_file_config_json")
    return TenantOut(
        id=t["id"],
        name=t.get("name"),
        client_base_url=t.get("client_base_url"),
        client_sync_path=t.get("client_sync_path"),
        client_attachment_path=t.get("client_attachment_path"),
        active=t.get("active", True),
        created_at=iso(t["created_ts"]) or "",
        updated_at=iso(t.get("updated_ts")),
        client_auth=ClientAuthOut(method=t.get("client_auth_method") or "none", user=t.get("client_auth_user"),
                                  has_secret=bool(t.get("client_auth_secret_enc"))),
        rate_limits=RateLimits(hourly=t.get("rate_limit_hourly"), daily=t.get("rate_limit_daily")),
        large_file_config=json.loads(lfc) if lfc else None,
        tracking=TrackingConfig.of(t),
        default_from=DefaultFrom.of(t),
    )


def account_out(a: dict[str, Any]) -> AccountOut:
    fields = {k: v for k, v in a.items() if k not in ("password_enc", "created_ts", "updated_ts")}
    return AccountOut(**fields, has_password=bool(a.get("password_enc")),
                      created_at=iso(a["created_ts"]) or "", updated_at=iso(a["updated_ts"]) or "")


def _stored_json(raw: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tenant_or_404(st: ApiState, tenant_id: str) -> dict[str, Any]:
    tenant = st.tenants.get(tenant_id)
    if tenant is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tenant_id!r} does not exist")
    return tenant


def _key_ids(st: ApiState, tenant_id: str) -> list[str]:
    return sorted(k for k, v in list(st.apikeys.items.items()) if v.get("tenant_id") == tenant_id)


async def _visible(st: ApiState, offsets: dict[str, dict[int, int]]) -> None:
    await st.wait_visible({t: o for t, o in offsets.items() if t in _VIEWED})


@router.get("/tenants", tags=["tenants"], response_model=TenantList, summary="List tenants (admin)",
            responses=errors(401, 403))
async def list_tenants(request: Request, active_only: bool = Query(False)) -> TenantList:
    st = state_of(request)
    require_admin(authenticate(request, st))
    tenants = sorted(list(st.tenants.items.values()), key=lambda t: t["id"])
    return TenantList(tenants=[tenant_out(t) for t in tenants if t.get("active", True) or not active_only])


@router.get("/tenant/{tenant_id}", tags=["tenants"], response_model=TenantOut,
            summary="Get one tenant's configuration", responses=errors(401, 404))
async def get_tenant(tenant_id: str, request: Request) -> TenantOut:
    st = state_of(request)
    scope_tenant(authenticate(request, st), tenant_id)
    return tenant_out(_tenant_or_404(st, tenant_id))


@router.put("/tenant/{tenant_id}", tags=["tenants"], response_model=Ok,
            summary="Update a tenant (partial; the API key is unchanged; admin-only fields need the admin token)",
            responses=errors(400, 401, 403, 404, 422))
async def update_tenant(tenant_id: str, body: TenantUpdate, request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    scope_tenant(actor, tenant_id)
    _tenant_or_404(st, tenant_id)
    field_policy.check_write("tenant", actor, body)  # 403 admin_only_field before anything else
    url_checks.check_tenant_fields(body, tenant_id, st.settings)  # 422, nothing written
    given = body.model_fields_set

    def build() -> ConfigWrite:  # from the view caught up to the end: re-run if another API instance wrote
        tenant = dict(_tenant_or_404(st, tenant_id))
        if "name" in given:
            tenant["name"] = body.name
        if "client_base_url" in given:
            tenant["client_base_url"] = str(body.client_base_url).rstrip("/") if body.client_base_url else None
        for f in ("client_sync_path", "client_attachment_path"):
            if f in given:
                tenant[f] = getattr(body, f)
        if "client_auth" in given:
            method, user, secret = client_auth_fields(body.client_auth, st.box)
            tenant.update(client_auth_method=method, client_auth_user=user, client_auth_secret_enc=secret)
        if "rate_limits" in given:
            tenant["rate_limit_hourly"] = body.rate_limits.hourly if body.rate_limits else None
            tenant["rate_limit_daily"] = body.rate_limits.daily if body.rate_limits else None
        if "large_file_config" in given:
            lfc = field_policy.keep_admin_subfields("tenant", "large_file_config", body.large_file_config_dict(),
                                                    _stored_json(tenant.get("large_file_config_json")), actor)
            tenant["large_file_config_json"] = json.dumps(lfc) if lfc else None
        if "tracking" in given:
            tenant.update((body.tracking or TrackingConfig()).record_fields())
        if "default_from" in given:  # null clears it
            tenant.update(body.default_from.record_fields() if body.default_from
                          else {"default_from_name": None, "default_from_email": None})
        if body.active is not None:
            tenant["active"] = body.active
        tenant["updated_ts"] = int(time.time() * 1000)
        return ConfigWrite("tenant.update", tenant_id, actor, "PUT /tenant/{tenant_id}", "Tenant", tenant,
                           [ConfigRecord(CONFIG_TENANTS, tenant_id, "Tenant", tenant)])

    offsets = await st.writer.update_config(await st.writer.shard_of(tenant_id), st.tenants.catch_up, build)
    await _visible(st, offsets)
    return Ok()


@router.delete("/tenant/{tenant_id}", tags=["tenants"], response_model=Ok,
               summary="Delete a tenant with its accounts, keys and messages (admin)", responses=errors(401, 403, 404))
async def delete_tenant(tenant_id: str, request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    _tenant_or_404(st, tenant_id)
    accounts = [k for k, v in list(st.accounts.items.items()) if v.get("tenant_id") == tenant_id]
    records = [ConfigRecord(CONFIG_TENANTS, tenant_id, None, None),
               ConfigRecord(CONFIG_SUSPENSIONS, tenant_id, None, None)]
    records += [ConfigRecord(CONFIG_ACCOUNTS, k, None, None) for k in accounts]
    records += [ConfigRecord(CONFIG_APIKEYS, k, None, None) for k in _key_ids(st, tenant_id)]
    # the sender/metrics drop the tenant's messages when they see tenant.delete
    offsets = await st.writer.append_config("tenant.delete", tenant_id, actor, "DELETE /tenant/{tenant_id}",
                                            "TenantRef", {"tenant_id": tenant_id}, records)
    await _visible(st, offsets)
    return Ok()


@router.post("/tenant/{tenant_id}/api-key", tags=["tenants"], response_model=ApiKeyOut,
             summary="Rotate the tenant's API key (admin): old keys die at once, the new one is shown once",
             responses=errors(400, 401, 403, 404, 422))
async def rotate_api_key(tenant_id: str, request: Request, body: ApiKeyIn | None = None) -> ApiKeyOut:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    _tenant_or_404(st, tenant_id)
    now = int(time.time() * 1000)
    expires_ts = key_expiry(body.expires_at if body else None, body.expires_in_days if body else None, now)
    old = _key_ids(st, tenant_id)
    api_key, key_id, key_hash = new_api_key(st.pepper)
    record = {"key_id": key_id, "tenant_id": tenant_id, "key_hash": key_hash, "created_ts": now,
              "expires_ts": expires_ts}
    records = [ConfigRecord(CONFIG_APIKEYS, k, None, None) for k in old]
    records.append(ConfigRecord(CONFIG_APIKEYS, key_id, "ApiKey", record))
    offsets = await st.writer.append_config(
        "apikey.rotate", tenant_id, actor, "POST /tenant/{tenant_id}/api-key", "ApiKeyRotate",
        {**record, "revoked_key_ids": old}, records)
    await _visible(st, offsets)
    return ApiKeyOut(api_key=api_key, expires_at=expires_ts // 1000 if expires_ts is not None else None)


@router.delete("/tenant/{tenant_id}/api-key", tags=["tenants"], response_model=Ok,
               summary="Revoke every API key of the tenant (admin)", responses=errors(401, 403, 404))
async def revoke_api_keys(tenant_id: str, request: Request) -> Ok:
    st = state_of(request)
    actor = authenticate(request, st)
    require_admin(actor)
    _tenant_or_404(st, tenant_id)
    records = [ConfigRecord(CONFIG_APIKEYS, k, None, None) for k in _key_ids(st, tenant_id)]
    offsets = await st.writer.append_config("apikey.revoke", tenant_id, actor, "DELETE /tenant/{tenant_id}/api-key",
                                            "TenantRef", {"tenant_id": tenant_id}, records)
    await _visible(st, offsets)
    return Ok()


def _account_tenant(request: Request, st: ApiState, tenant_id: str | None) -> tuple[Any, str]:
    actor = authenticate(request, st)
    tid = scope_tenant(actor, tenant_id)
    if not tid:
        raise ApiError(400, "missing_tenant_id", "tenant_id is required with the admin token")
    _tenant_or_404(st, tid)
    return actor, tid


@router.get("/accounts", tags=["accounts"], response_model=AccountList,
            summary="List the tenant's SMTP accounts (passwords never returned)", responses=errors(400, 401, 404))
async def list_accounts(request: Request, tenant_id: str | None = Query(None)) -> AccountList:
    st = state_of(request)
    _, tid = _account_tenant(request, st, tenant_id)
    accounts = sorted((a for a in list(st.accounts.items.values()) if a.get("tenant_id") == tid),
                      key=lambda a: a["id"])
    return AccountList(accounts=[account_out(a) for a in accounts])


@router.delete("/account/{account_id}", tags=["accounts"], response_model=Ok,
               summary="Delete one of the tenant's SMTP accounts", responses=errors(400, 401, 404))
async def delete_account(account_id: str, request: Request, tenant_id: str | None = Query(None)) -> Ok:
    st = state_of(request)
    actor, tid = _account_tenant(request, st, tenant_id)
    key = account_key(tid, account_id)
    if st.accounts.get(key) is None:
        raise ApiError(404, "account_not_found", f"account {account_id!r} does not exist for tenant {tid!r}")
    offsets = await st.writer.append_config(
        "account.delete", tid, actor, "DELETE /account/{account_id}", "AccountRef",
        {"tenant_id": tid, "account_id": account_id}, [ConfigRecord(CONFIG_ACCOUNTS, key, None, None)])
    await _visible(st, offsets)
    return Ok()
