"""``POST /api/smtp-token-generate`` {email, password} -> the seed's token answer (not the envelope):
``{"status": true, "message": "Token Created Successfully", "token": "<user id>|<secret>", "user": {...}}``.

A wrong password and an unknown email get the same 401 ``{"status": false, "message": "Invalid
email or password"}`` after the same argon2 work. Failed attempts are counted per email (per API
process): after ``provider_token_max_failures`` within ``provider_token_throttle_window_s`` the
route answers 429 with Retry-After, even for the right password, until the window passes. The
token's secret is stored only as a keyed hash, with its expiry (``provider_token_ttl_s``); it is
written by a fenced update of the users shard, so a token is never minted for a user being deleted."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from services.api.commands import ConfigRecord, ConfigWrite
from services.api.deps import state_of
from services.api.provider.auth import ProviderUser, new_token
from services.api.provider.common import now_ms, write_fenced
from services.api.provider.envelope import provider_router, validation_messages
from services.api.provider.users import USERS_SHARD, password_matches
from services.common.topics import CONFIG_PROVIDER_TOKENS

router = provider_router(prefix="/api", tags=["provider"])
INVALID = "Invalid email or password"
MAX_TRACKED = 100_000  # emails with recent failures remembered per process (oldest forgotten first)


class TokenIn(BaseModel):
    email: str = Field(..., max_length=254)
    password: str = Field(..., max_length=1024)


class Throttle:
    """Recent failure times per email; ``retry_after`` > 0 while the email is throttled."""

    def __init__(self) -> None:
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, email: str, window: float, now: float) -> deque[float]:
        q = self._fails.get(email)
        if q is None:
            return deque()
        while q and q[0] <= now - window:
            q.popleft()
        if not q:
            del self._fails[email]
        return q

    def retry_after(self, email: str, limit: int, window: float, inflight: int = 0) -> int:
        """Seconds to wait (0: go ahead). Attempts still being checked count as failures, so
        concurrent guesses cannot slip past the limit while the first ones are being hashed."""
        now = time.monotonic()
        q = self._recent(email, window, now)
        if len(q) >= limit:
            return max(1, math.ceil(q[-limit] + window - now))
        if len(q) + inflight >= limit:
            return 1
        return 0

    def fail(self, email: str) -> None:
        q = self._fails.pop(email, None) or deque(maxlen=1000)
        q.append(time.monotonic())
        self._fails[email] = q
        while len(self._fails) > MAX_TRACKED:
            self._fails.popitem(last=False)

    def clear(self, email: str) -> None:
        self._fails.pop(email, None)


_throttle = Throttle()
_inflight: dict[str, int] = {}  # email -> attempts being checked now


def _answer(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return JSONResponse({"status": status == 200, "message": message, **extra}, status_code=status, headers=headers)


@router.post("/smtp-token-generate", summary="Generate an API token (public)",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": TokenIn.model_json_schema()}}}},
             responses={200: {"description": "Token Created Successfully"},
                        401: {"description": "Invalid email or password (same answer for an unknown email)"},
                        422: {"description": "email/password missing"},
                        429: {"description": "too many failed attempts for this email"}})
async def token_generate(request: Request) -> JSONResponse:
    st = state_of(request)
    try:
        body = TokenIn.model_validate_json(await request.body() or b"null")
    except ValidationError as exc:
        messages = validation_messages([{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()])
        return _answer(422, messages[0], errors=messages)
    email = body.email.strip().lower()
    s = st.settings
    wait = _throttle.retry_after(email, s.provider_token_max_failures, s.provider_token_throttle_window_s,
                                 _inflight.get(email, 0))
    if wait:
        return _answer(429, "Too many login attempts. Please try again later.", retry_after=wait)
    _inflight[email] = _inflight.get(email, 0) + 1
    try:
        user_id = st.provider.user_by_email.get(email)
        rec = st.provider.user(user_id) if user_id is not None else None
        ok = await password_matches(rec["password_hash"] if rec else None, body.password)
        if not ok or rec is None or st.tenants.get(rec["tenant_id"]) is None:
            _throttle.fail(email)
            return _answer(401, INVALID)
        _throttle.clear(email)
    finally:
        left = _inflight.pop(email, 1) - 1
        if left > 0:
            _inflight[email] = left
    user = ProviderUser(int(rec["user_id"]), rec["tenant_id"], rec["email"], rec["name"])
    token, token_id, secret_hash = new_token(st.pepper, user.user_id)
    created = now_ms()
    token_rec = {"token_id": token_id, "user_id": user.user_id, "tenant_id": user.tenant_id,
                 "secret_hash": secret_hash, "created_ts": created,
                 "expires_ts": created + s.provider_token_ttl_s * 1000}

    def build() -> ConfigWrite:
        current = st.provider.user(user.user_id)
        if current is None or current["tenant_id"] != user.tenant_id:
            raise _Gone
        return ConfigWrite("provider.token.create", user.tenant_id, user.actor, "POST /api/smtp-token-generate",
                           "ProviderToken", token_rec,
                           [ConfigRecord(CONFIG_PROVIDER_TOKENS, token_id, "ProviderToken", token_rec)])

    try:
        await write_fenced(st, USERS_SHARD, st.provider.users.catch_up, build)
    except _Gone:
        return _answer(401, INVALID)
    return JSONResponse({"status": True, "message": "Token Created Successfully", "token": token,
                         "user": {"id": user.user_id, "name": user.name, "email": user.email}})


class _Gone(Exception):
    """The user was deleted between the password check and the token write."""
