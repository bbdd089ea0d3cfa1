"""Provider users of a tenant (PRODUCT.md section 6), on the mail-proxy API's tenant routes:
``POST /tenant/{id}/users`` {email, name, password}, ``GET /tenant/{id}/users``,
``DELETE /tenant/{id}/users/{user_id}`` (admin or the tenant's own key; mail-proxy error shape).

Passwords are hashed with argon2id before anything is written; the hash is the only form that
reaches a topic. An email names one user across all tenants (the token route names no tenant):
creation is a fenced read-modify-write of the users view (shard ``provider-users``), so two API
replicas cannot create the same email twice. Deleting a user tombstones it and every token of it
in the same transaction."""

from __future__ import annotations

import asyncio
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.api.auth import authenticate, scope_tenant
from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.errors import ApiError
from services.api.models import errors
from services.api.provider.common import now_ms, valid_email, write_fenced
from services.api.provider.ids import next_id
from services.api.state import ApiState
from services.common.topics import CONFIG_PROVIDER_TOKENS, CONFIG_PROVIDER_USERS

router = APIRouter(tags=["provider users"])
USERS_SHARD = "provider-users"
_hasher = PasswordHasher()  # argon2id, the library's current RFC 9106 low-memory parameters
# a real hash to verify against for an unknown email: the same work (and time) as a wrong password
_DUMMY_HASH = _hasher.hash("postbus-no-such-user")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def password_matches(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return bool(_hasher.verify(password_hash or _DUMMY_HASH, password)) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


class UserIn(BaseModel):
    email: str = Field(..., max_length=254)
    name: str = Field(..., min_length=1, max_length=200)
    password: str = Field(..., min_length=8, max_length=1024, description="write-only; stored as an argon2id hash")


class UserOut(BaseModel):
    id: int
    name: str
    email: str


class UserCreated(BaseModel):
    ok: bool = True
    user: UserOut


class UserList(BaseModel):
    ok: bool = True
    users: list[UserOut]


def _out(rec: dict[str, Any]) -> UserOut:
    return UserOut(id=int(rec["user_id"]), name=rec["name"], email=rec["email"])


def _tenant(request: Request, st: ApiState, tenant_id: str) -> Any:
    actor = authenticate(request, st)
    scope_tenant(actor, tenant_id)  # a tenant key naming another tenant: 401 tenant_mismatch
    if st.tenants.get(tenant_id) is None:
        raise ApiError(404, "tenant_not_found", f"tenant {tenant_id!r} does not exist")
    return actor


@router.post("/tenant/{tenant_id}/users", response_model=UserCreated, responses=errors(401, 403, 404, 409, 422),
             summary="Create a provider API user of the tenant (admin or the tenant's key)")
async def create_user(tenant_id: str, body: UserIn, request: Request) -> UserCreated:
    st = state_of(request)
    actor = _tenant(request, st, tenant_id)
    email = body.email.strip().lower()
    if not valid_email(email):
        raise ApiError(422, "invalid_email", "email is not a valid address")
    if st.provider.user_by_email.get(email) is not None:  # cheap early refusal; re-checked fenced below
        raise ApiError(409, "email_taken", "a provider user with this email already exists")
    password_hash = await hash_password(body.password)
    user_id = await next_id(st, "user", tenant_id, actor)
    rec = {"user_id": user_id, "tenant_id": tenant_id, "email": email, "name": body.name.strip(),
           "password_hash": password_hash, "created_ts": now_ms()}

    def build() -> ConfigWrite:
        if st.provider.user_by_email.get(email) is not None:
            raise ApiError(409, "email_taken", "a provider user with this email already exists")
        return ConfigWrite("provider.user.create", tenant_id, actor, "POST /tenant/{tenant_id}/users",
                           "ProviderUser", rec,
                           [ConfigRecord(CONFIG_PROVIDER_USERS, str(user_id), "ProviderUser", rec)])

    await write_fenced(st, USERS_SHARD, st.provider.users.catch_up, build)
    return UserCreated(user=_out(rec))


@router.get("/tenant/{tenant_id}/users", response_model=UserList, responses=errors(401, 404),
            summary="List the tenant's provider API users")
async def list_users(tenant_id: str, request: Request) -> UserList:
    st = state_of(request)
    _tenant(request, st, tenant_id)
    users = sorted((u for u in list(st.provider.users.items.values()) if u["tenant_id"] == tenant_id),
                   key=lambda u: int(u["user_id"]))
    return UserList(users=[_out(u) for u in users])


class Ok(BaseModel):
    ok: bool = True


@router.delete("/tenant/{tenant_id}/users/{user_id}", response_model=Ok, responses=errors(401, 404),
               summary="Delete a provider user; every token of it stops working at once")
async def delete_user(tenant_id: str, user_id: str, request: Request) -> Ok:
    st = state_of(request)
    actor = _tenant(request, st, tenant_id)  # authenticated before the id is even parsed
    if not user_id.isdigit() or len(user_id) > 18:
        raise ApiError(404, "user_not_found", "no such user")
    uid = int(user_id)
    rec = st.provider.user(uid)
    if rec is None or rec["tenant_id"] != tenant_id:
        raise ApiError(404, "user_not_found", f"user {user_id} does not exist for tenant {tenant_id!r}")

    def build() -> ConfigWrite:
        current = st.provider.user(uid)
        if current is None or current["tenant_id"] != tenant_id:
            raise ApiError(404, "user_not_found", f"user {user_id} does not exist for tenant {tenant_id!r}")
        tokens = sorted(k for k, v in list(st.provider.tokens.items.items()) if int(v["user_id"]) == uid)
        records = [ConfigRecord(CONFIG_PROVIDER_USERS, str(uid), None, None)]
        records += [ConfigRecord(CONFIG_PROVIDER_TOKENS, k, None, None) for k in tokens]
        return ConfigWrite("provider.user.delete", tenant_id, actor, "DELETE /tenant/{tenant_id}/users/{user_id}",
                           "ProviderRef", {"tenant_id": tenant_id, "user_id": uid, "kind": "user", "ids": tokens},
                           records)

    async def catch_up() -> None:
        await asyncio.gather(st.provider.users.catch_up(), st.provider.tokens.catch_up())

    await write_fenced(st, USERS_SHARD, catch_up, build)
    return Ok()
