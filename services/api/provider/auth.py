"""Provider API authentication: ``Authorization: Bearer <user_id>|<token_id>.<secret>``.

A token is issued by ``POST /api/smtp-token-generate``; only an HMAC-SHA256 of its secret (keyed
with the instance pepper) is stored, on ``postbus.config.provider-tokens``, with its expiry. A
token is valid while its record exists (deleting the user tombstones its tokens), has not
expired, names the same user as its prefix and that user and its tenant still exist.

Every protected route also takes ``user_id`` (query for GET, JSON body for POST) and it must be
the token's user: missing -> 422 "The user id field is required.", another -> 403 "Wrong user id"."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request

from services.api.commands import Actor
from services.api.deps import state_of
from services.api.provider.envelope import ProviderError

TOKEN_ID_BYTES = 8  # token ids are 16 hex characters
_TOKEN = re.compile(r"^(\d{1,18})\|([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
UNAUTHENTICATED = "Unauthenticated."


@dataclass(frozen=True)
class ProviderUser:
    user_id: int
    tenant_id: str
    email: str
    name: str

    @property
    def actor(self) -> Actor:
        """The actor recorded on this user's commands (tenant-scoped)."""
        return Actor("tenant", self.tenant_id, f"provider-user-{self.user_id}")


def hash_secret(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, b"postbus-provider-token\0" + secret.encode(), hashlib.sha256).hexdigest()


def new_token(pepper: bytes, user_id: int) -> tuple[str, str, str]:
    """(plain token for the client, token id, secret hash to store)."""
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(40)
    return f"{user_id}|{token_id}.{secret}", token_id, hash_secret(pepper, secret)


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def provider_user(request: Request) -> ProviderUser:
    """FastAPI dependency: the token's user, or 401 "Unauthenticated."."""
    st = state_of(request)
    token = _bearer(request)
    m = _TOKEN.match(token or "")
    if not m:
        raise ProviderError(401, UNAUTHENTICATED)
    user_id, token_id, secret = int(m[1]), m[2], m[3]
    rec = st.provider.tokens.get(token_id)
    if (rec is None or int(rec["user_id"]) != user_id
            or not hmac.compare_digest(rec["secret_hash"], hash_secret(st.pepper, secret))):
        raise ProviderError(401, UNAUTHENTICATED)
    if int(rec["expires_ts"]) <= int(time.time() * 1000):
        raise ProviderError(401, "The token has expired.")
    user = st.provider.user(user_id)
    if user is None or user["tenant_id"] != rec["tenant_id"] or st.tenants.get(user["tenant_id"]) is None:
        raise ProviderError(401, UNAUTHENTICATED)
    return ProviderUser(user_id, user["tenant_id"], user["email"], user["name"])


def check_user_id(user: ProviderUser, user_id: Any) -> None:
    """``user_id`` of a protected route: required (422) and the token's user (403)."""
    if user_id is None or user_id == "":
        raise ProviderError(422, "The user id field is required.")
    if isinstance(user_id, bool):
        raise ProviderError(422, "The user id must be an integer.")
    try:
        value = int(str(user_id).strip())
    except ValueError:
        raise ProviderError(422, "The user id must be an integer.") from None
    if value != user.user_id:
        raise ProviderError(403, "Wrong user id")


async def checked_user(request: Request, user: ProviderUser = Depends(provider_user)) -> ProviderUser:
    """FastAPI dependency of every protected route: the token's user, with ``user_id`` checked
    (query string for GET, JSON body for other methods) before the rest of the request is validated."""
    if request.method in ("GET", "HEAD", "DELETE"):
        user_id: Any = request.query_params.get("user_id")
    else:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise ProviderError(422, "The request body must be valid JSON.") from None
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if user_id is None:  # a form-less client may still send it in the query string
            user_id = request.query_params.get("user_id")
    check_user_id(user, user_id)
    return user
