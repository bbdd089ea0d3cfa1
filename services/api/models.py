"""Request/response models of the mail-proxy surface (documented in /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"


class ClientAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["none", "bearer", "basic"] = "none"
    token: str | None = Field(None, description="bearer token (write-only)")
    user: str | None = None
    password: str | None = Field(None, description="basic-auth password (write-only)")


class RateLimits(BaseModel):
    hourly: int | None = Field(None, ge=0)
    daily: int | None = Field(None, ge=0)


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(..., pattern=ID_PATTERN)
    name: str | None = Field(None, max_length=200)
    client_base_url: HttpUrl | None = None
    client_sync_path: str | None = Field(None, pattern=r"^/[^\s]*$", max_length=500)
    client_attachment_path: str | None = Field(None, pattern=r"^/[^\s]*$", max_length=500)
    client_auth: ClientAuth | None = None
    rate_limits: RateLimits | None = None
    large_file_config: dict[str, Any] | None = None
    active: bool = True


class TenantCreated(BaseModel):
    ok: bool = True
    tenant_id: str
    created: bool
    api_key: str | None = Field(None, description="the tenant's API key: shown once, on creation only")


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(..., pattern=ID_PATTERN)
    tenant_id: str | None = Field(None, description="defaults to the calling tenant")
    host: str = Field(..., min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.\-:\[\]]+$")
    port: int = Field(587, ge=1, le=65535)
    user: str | None = Field(None, max_length=320)
    password: str | None = Field(None, max_length=1000, description="write-only; never returned")
    use_tls: bool | None = Field(None, description="true: implicit TLS; false: plain; null: STARTTLS if offered")
    batch_size: int | None = Field(None, ge=1, le=10000)
    limit_per_minute: int | None = Field(None, ge=0)
    limit_per_hour: int | None = Field(None, ge=0)
    limit_per_day: int | None = Field(None, ge=0)
    limit_behavior: Literal["defer", "reject"] = "defer"


class Ok(BaseModel):
    ok: bool = True


class AddMessagesIn(BaseModel):
    messages: list[Any] = Field(..., description="message payloads; at most 1000 per call")
    default_priority: Any = Field(None, description="0-3 or immediate/high/medium/low; default 2")


class RejectedItem(BaseModel):
    id: str | None
    reason: str


class AddMessagesOut(BaseModel):
    ok: bool
    queued: int
    rejected: list[RejectedItem]


class RunNowOut(BaseModel):
    ok: bool = True
    scope: str
