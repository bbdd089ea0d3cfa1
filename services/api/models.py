"""Request/response models of the mail-proxy surface (documented in /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from services.api.pem import MAX_PEM_CHARS, CaBundlePem

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
INT32_MAX = 2_147_483_647  # Avro "int" fields on the topics


class ClientAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["none", "bearer", "basic"] = "none"
    token: str | None = Field(None, description="bearer token (write-only)")
    user: str | None = None
    password: str | None = Field(None, description="basic-auth password (write-only)")


class RateLimits(BaseModel):
    hourly: int | None = Field(None, ge=0, le=INT32_MAX)
    daily: int | None = Field(None, ge=0, le=INT32_MAX)


class TrackingConfig(BaseModel):
    """Open/click tracking and List-Unsubscribe for the tenant's messages (all off by default)."""
    model_config = ConfigDict(extra="forbid")
    opens: bool = Field(False, description="append a tracking pixel to html bodies")
    clicks: bool = Field(False, description="rewrite http(s) links of html bodies to a signed redirect")
    unsubscribe: bool = Field(False, description="List-Unsubscribe + List-Unsubscribe-Post one-click headers")
    domain: str | None = Field(None, max_length=253, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?$",
                               description="tracking host (served over https, pointing at Postbus); "
                                           "default: the configured tracking base URL")

    def record_fields(self) -> dict[str, Any]:
        return {"tracking_opens": self.opens, "tracking_clicks": self.clicks,
                "tracking_unsubscribe": self.unsubscribe, "tracking_domain": self.domain}

    @staticmethod
    def of(record: dict[str, Any]) -> TrackingConfig:
        return TrackingConfig(opens=record.get("tracking_opens", False), clicks=record.get("tracking_clicks", False),
                              unsubscribe=record.get("tracking_unsubscribe", False),
                              domain=record.get("tracking_domain"))


class DefaultFrom(BaseModel):
    """The tenant's default sender, returned by the tenant SMTP API's config (seed: ``default_from``)."""
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200, pattern=r"^[^\r\n\x00]*$")
    email: str = Field(..., max_length=254, pattern=r"^[^@\s<>,;\"]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")

    def record_fields(self) -> dict[str, Any]:
        return {"default_from_name": self.name, "default_from_email": str(self.email)}

    @staticmethod
    def of(record: dict[str, Any]) -> DefaultFrom | None:
        email = record.get("default_from_email")
        return DefaultFrom(name=record.get("default_from_name"), email=email) if email else None


class LargeFileConfig(BaseModel):
    """Large attachments: warn, reject, or rewrite to a signed download link in storage. Storage is the
    operator's: a tenant picks one of the operator's named roots (``storage_root``); a raw root URL
    (``storage_url``) is an admin-only field (services/api/field_policy.py)."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    max_size_mb: float | None = Field(None, gt=0, le=1_000_000)
    action: str | None = Field(None, pattern=r"^(?i:warn|reject|rewrite)$")
    file_ttl_days: float | None = Field(None, gt=0, le=3650)
    public_base_url: str | None = Field(None, max_length=500, description="base URL of download links")
    storage_root: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                     description="name of one of the operator's storage roots")
    storage_url: str | None = Field(None, max_length=2000, description=(
        "admin only: a raw fsspec root URL (no protocol chains, no credentials; a local folder must "
        "lie under POSTBUS_ATTACHMENTS_FILE_ROOTS)"))


class _TenantFields(BaseModel):
    """The tenant fields shared by create (POST /tenant) and partial update (PUT /tenant/{id}).
    Who may write which of them: services/api/field_policy.py."""
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, max_length=200)
    client_base_url: HttpUrl | None = None
    client_sync_path: str | None = Field(None, pattern=r"^/[^\s]*$", max_length=500)
    client_attachment_path: str | None = Field(None, pattern=r"^/[^\s]*$", max_length=500)
    client_auth: ClientAuth | None = None
    rate_limits: RateLimits | None = Field(None, description="admin only")
    large_file_config: LargeFileConfig | None = None
    tracking: TrackingConfig | None = None
    default_from: DefaultFrom | None = None

    def large_file_config_dict(self) -> dict[str, Any] | None:
        return self.large_file_config.model_dump(exclude_unset=True) if self.large_file_config else None


class TenantIn(_TenantFields):
    id: str = Field(..., pattern=ID_PATTERN)
    active: bool = True
    expires_at: int | None = Field(None, ge=0, description="API key expiry (unix seconds), on creation only")
    expires_in_days: float | None = Field(None, gt=0, le=36500, description="API key lifetime in days")


class TenantCreated(BaseModel):
    ok: bool = True
    tenant_id: str
    created: bool
    api_key: str | None = Field(None, description="the tenant's API key: shown once, on creation only")


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(..., pattern=ID_PATTERN)
    tenant_id: str | None = Field(None, description="defaults to the calling tenant")
    host: str = Field(..., min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.\-:\[\]]+$", description=(
        "SMTP server name or address; loopback/private/link-local addresses are refused (422 "
        "host_not_allowed) unless the operator's network policy allows them"))
    port: int = Field(587, ge=1, le=65535)
    user: str | None = Field(None, max_length=320)
    password: str | None = Field(None, max_length=1000, description="write-only; never returned")
    use_tls: bool | None = Field(None, description=(
        "true: implicit TLS; false: plain; null: STARTTLS if offered. With a user, AUTH is only sent "
        "over TLS: STARTTLS is required (also with false) unless allow_insecure_auth"))
    batch_size: int | None = Field(None, ge=-INT32_MAX, le=10000, description=(
        "at most this many of the account's messages in flight at once (1 = strict priority + FIFO "
        "order); the account's concurrency is min(max_connections, batch_size). null, 0 or negative: no cap"))
    limit_per_minute: int | None = Field(None, ge=-INT32_MAX, le=INT32_MAX,
                                   description="null, 0 or negative: unlimited")
    limit_per_hour: int | None = Field(None, ge=-INT32_MAX, le=INT32_MAX,
                                 description="null, 0 or negative: unlimited")
    limit_per_day: int | None = Field(None, ge=-INT32_MAX, le=INT32_MAX,
                                description="null, 0 or negative: unlimited")
    limit_behavior: Literal["defer", "reject"] = "defer"
    max_connections: int | None = Field(None, ge=1, le=100, description="SMTP connections for this account; "
                                        "null: the sender's default (POSTBUS_SENDER_CONNECTIONS_PER_ACCOUNT)")
    tls_verify: bool = Field(True, description="verify the server certificate; false is an explicit opt-out")
    ca_bundle_pem: CaBundlePem | None = Field(None, max_length=MAX_PEM_CHARS, description=(
        "extra CA certificates (PEM) trusted for this account's TLS, on top of the system CAs"))
    allow_insecure_auth: bool = Field(False, description=(
        "explicit opt-in: send the password even when the connection is not encrypted (no TLS, no "
        "STARTTLS offered); default false: such a message fails and no AUTH is sent"))


class Ok(BaseModel):
    ok: bool = True


class AddMessagesIn(BaseModel):
    messages: list[Any] = Field(..., description="message payloads; at most 1000 per call")
    default_priority: Any = Field(None, description="0-3 or immediate/high/medium/low; default 2")


class RejectedItem(BaseModel):
    id: str | None
    reason: str
    code: str | None = Field(None, description="stable identifier of the reason, where one is defined")


class AddMessagesOut(BaseModel):
    ok: bool
    queued: int
    rejected: list[RejectedItem]


class RunNowOut(BaseModel):
    ok: bool = True
    scope: str


# --- tenants, API keys, accounts, instance, status, command log (routes_tenants / routes_admin) ---


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    ok: bool = False
    error: ErrorBody


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the documented error statuses of a route."""
    text = {400: "bad request", 401: "missing, invalid or expired token, or another tenant's key",
            403: "admin token required", 404: "not found", 422: "request is not valid"}
    return {s: {"model": ErrorOut, "description": text.get(s, "error")} for s in statuses}


class TenantUpdate(_TenantFields):
    """PUT /tenant/{id}: every field optional; omitted fields keep their value."""
    active: bool | None = Field(None, description="admin only")


class ClientAuthOut(BaseModel):
    method: str
    user: str | None = None
    has_secret: bool


class TenantOut(BaseModel):
    id: str
    name: str | None = None
    client_base_url: str | None = None
    client_sync_path: str | None = None
    client_attachment_path: str | None = None
    active: bool
    created_at: str = Field(..., description="ISO 8601, UTC")
    updated_at: str | None = None
    client_auth: ClientAuthOut
    rate_limits: RateLimits
    large_file_config: dict[str, Any] | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    default_from: DefaultFrom | None = None


class TenantList(BaseModel):
    ok: bool = True
    tenants: list[TenantOut]


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    expires_at: int | None = Field(None, ge=0, description="expiry, unix seconds")
    expires_in_days: float | None = Field(None, gt=0, le=36500)


class ApiKeyOut(BaseModel):
    ok: bool = True
    api_key: str = Field(..., description="the new key: shown once")
    expires_at: int | None = None


class AccountOut(BaseModel):
    id: str
    tenant_id: str
    host: str
    port: int
    user: str | None = None
    has_password: bool
    use_tls: bool | None = None
    batch_size: int | None = None
    limit_per_minute: int | None = None
    limit_per_hour: int | None = None
    limit_per_day: int | None = None
    limit_behavior: str
    max_connections: int | None = None
    tls_verify: bool = True
    ca_bundle_pem: str | None = None
    allow_insecure_auth: bool = False
    created_at: str
    updated_at: str


class AccountList(BaseModel):
    ok: bool = True
    accounts: list[AccountOut]


class StatusOut(BaseModel):
    ok: bool = True
    active: bool


class BounceConfigIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enabled: bool | None = None
    imap_host: str | None = Field(None, max_length=253)
    imap_port: int | None = Field(None, ge=1, le=65535)
    imap_user: str | None = Field(None, max_length=320)
    imap_password: str | None = Field(None, max_length=1000, description="write-only; never returned")
    mailbox: str | None = Field(None, max_length=200)
    poll_interval_seconds: int | None = Field(None, ge=1, le=86400)


class InstanceIn(BaseModel):
    """PUT /instance: partial update; omitted fields keep their value."""
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, max_length=200)
    active: bool | None = None
    sync_interval_seconds: int | None = Field(None, ge=1, le=86400 * 7)
    report_retention_seconds: int | None = Field(None, ge=0, le=10 * 365 * 86400)
    bounce: BounceConfigIn | None = None


class BounceConfigOut(BaseModel):
    enabled: bool
    imap_host: str | None = None
    imap_port: int | None = None
    imap_user: str | None = None
    has_imap_password: bool
    mailbox: str | None = None
    poll_interval_seconds: int | None = None


class InstanceOut(BaseModel):
    name: str | None = None
    active: bool
    sync_interval_seconds: int
    report_retention_seconds: int
    bounce: BounceConfigOut
    updated_at: str | None = None


class InstanceResp(BaseModel):
    ok: bool = True
    instance: InstanceOut


class CommandLogEntry(BaseModel):
    command_id: str
    ts: int = Field(..., description="epoch milliseconds")
    type: str
    tenant_id: str | None = None
    actor: str
    route: str | None = None
    payload_schema: str
    payload: Any = Field(None, description="decoded payload, secrets redacted")
    outcome: str = Field("accepted", description="every command on the topic passed validation")
    partition: int
    offset: int


class GenroCommand(BaseModel):
    """One command in genro-mail-proxy 0.6's field names (the same commands as ``entries``)."""

    id: str
    command_ts: float = Field(..., description="unix seconds")
    endpoint: str | None = None
    tenant_id: str | None = None
    payload: Any = None
    response_status: int = Field(200, description="every command on the topic was accepted")


class CommandLogPage(BaseModel):
    ok: bool = True
    entries: list[CommandLogEntry]
    commands: list[GenroCommand] = Field(default_factory=list, description="the entries, as genro 0.6 names them")
    count: int
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")
