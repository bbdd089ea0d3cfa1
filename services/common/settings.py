"""Configuration from the environment (prefix ``POSTBUS_``), one object for every service."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBUS_", extra="ignore")

    # dev mode: allows a generated secret key and a generated admin token (local runs and tests only)
    dev: bool = False
    state_dir: Path = REPO_ROOT / ".state"
    instance: str = "local"

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_partitions: int = Field(8, ge=1)

    admin_token: str | None = None
    secret_key: str | None = Field(None, description="Fernet key that encrypts secrets on topics")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    write_timeout_s: float = 10.0

    metrics_url: str = "http://127.0.0.1:8010"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8010
    clickhouse_dsn: str | None = None
    metrics_batch_rows: int = 5000
    metrics_batch_ms: int = 200

    sender_metrics_port: int = 9101
    sender_connections_per_account: int = Field(8, ge=1, le=100)
    sender_max_attempts: int = Field(5, ge=1)
    sender_retry_base_s: float = 5.0
    sender_smtp_timeout_s: float = 30.0
    sender_ehlo_name: str | None = None

    reporter_metrics_port: int = 9102
    reporter_batch_size: int = Field(500, ge=1, le=10000)
    reporter_flush_ms: int = 200
    reporter_sync_interval_s: float = 300.0
    reporter_http_timeout_s: float = 15.0
    reporter_retry_max_s: float = 60.0
    client_sync_path_default: str = "/mail-proxy/sync"

    log_level: str = "INFO"

    # tenant SMTP API: reputation thresholds (rates over sent; only assessed from min_volume sent)
    reputation_bounce_watch: float = 0.02
    reputation_bounce_at_risk: float = 0.03
    reputation_complaint_watch: float = 0.001
    reputation_complaint_at_risk: float = 0.003
    reputation_min_volume: int = 100

    # tenant SMTP API: internal support principals, JSON list of
    # {"name": ..., "token_sha256": <hex sha256 of the token>, "scopes": ["smtp:read", "tenant:read"]}
    support_principals_json: str = "[]"

    # outbound domains (routes_domains, sender/domain_ledger): resolvers for ses-status checks as
    # "ip[:port],..." (empty = the system's), the verification TXT prefix, the ledger answer timeout
    dns_resolvers: str = ""
    dns_timeout_s: float = 3.0
    domain_verification_prefix: str = "_amazonses"
    domain_result_timeout_s: float = 10.0

    # tracking and complaints (sender/tracking, routes_tracking, routes_webhooks): public base URL of
    # the tracking/unsubscribe links (default: the API's own address), token lifetime, optional
    # mailto of List-Unsubscribe; SNS: the SigningCertURL/SubscribeURL host rule (matched against the
    # URL's host[:port]), a CA bundle for fetching them (default: the system's), allowed topic ARNs
    tracking_base_url: str | None = None
    tracking_token_ttl_days: int = Field(180, ge=1, le=3650)
    unsubscribe_mailto: str | None = None
    sns_cert_host_pattern: str = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
    sns_ca_file: str | None = None
    sns_topic_arns: str = ""

    # outbound network policy (common/netpolicy.py) for every connection a tenant can influence
    # (attachments, storage, client callbacks, webhooks): loopback/private/link-local/reserved targets
    # are refused unless allow_private_networks (local trials; `make up` turns it on) or the target's
    # network is listed in allowed_private_networks ("10.1.0.0/16,fd00::/8": internal receivers)
    allow_private_networks: bool = False
    allowed_private_networks: str = ""

    # attachments (sender/attachments.py, api/routes_files.py): size limit per attachment (over it:
    # permanent error unless the tenant's large_file_config handles it) and a hard cap on any fetch;
    # the per-process cache; the storage root of the `storage` mode when a tenant has none (fsspec
    # URL); local folders that a file:// storage URL may point into (comma-separated, default
    # <state_dir>/files); the public base URL of download links (default http://api_host:api_port)
    attachments_max_bytes: int = Field(25 * 1024 * 1024, ge=1)
    attachments_hard_max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    attachments_fetch_timeout_s: float = Field(30.0, gt=0)
    attachments_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)
    attachments_storage_url: str | None = None
    attachments_file_roots: str = ""
    attachments_public_base_url: str | None = None

    # sender delivery engine (sender/rate_limits, throttle, outcomes, smtp_pool): concurrency caps,
    # retry horizon, SMTP timeouts and TLS, per-destination ("MX site") throttling
    sender_max_concurrent_smtp: int = Field(64, ge=1, description="SMTP transactions at once per sender process")
    sender_retry_max_age_s: float = Field(172800.0, gt=0, description="no retry later than this after the first try")
    sender_retry_max_delay_s: float = Field(3600.0, gt=0)
    sender_connect_timeout_s: float = 15.0
    sender_command_timeout_s: float = 60.0  # each SMTP command
    sender_send_timeout_s: float = 300.0  # one whole transaction (MAIL .. end of DATA)
    sender_idle_noop_s: float = 10.0  # a pooled session idle longer than this is checked with NOOP
    sender_idle_close_s: float = 30.0  # ... and closed after this long
    sender_ca_bundle: str | None = None  # extra CA certificates (PEM file) trusted for SMTP TLS
    # explicit certificate-verification opt-out, per account: "tenant_id/account_id,..." (default none)
    sender_tls_insecure_accounts: str = ""
    # TESTING ONLY: length in seconds of the "minute" rate-limit window (hour = 60x, day = 1440x)
    sender_rate_minute_s: float = Field(60.0, gt=0)
    sender_mx_lookup: bool = True  # False: every recipient domain is its own site (no DNS)
    sender_mx_cache_ttl_s: float = 3600.0
    sender_site_per_minute: int = Field(600, ge=0, description="messages/min per MX site (0 = no limit)")
    sender_site_connections: int = Field(20, ge=0, description="transactions at once per MX site (0 = no limit)")
    # per-site overrides, JSON {"<MX host suffix or domain>": {"per_minute": n, "connections": n}}
    sender_site_overrides_json: str = "{}"

    # outbound domains, automatic suspension (sender/domain_ledger): a domain whose month's bounce
    # rate (percent of its sent mail) passes the threshold is suspended once it sent min_sent
    domain_suspend_bounce_rate: float = Field(3.0, gt=0, le=100)
    domain_suspend_min_sent: int = Field(100, ge=1)

    # inbound bounces / complaints / PEC (services/inbound): the SMTP listener of the bounce
    # return-path domain, its readiness/Prometheus port, the largest message it takes; PEC: a sent
    # message whose From domain is in pec_sender_domains ("a.it,b.it") expects an acceptance
    # receipt within pec_timeout_s, else a pec_timeout event
    inbound_smtp_host: str = "127.0.0.1"
    inbound_smtp_port: int = 2526  # 2525 is the local SMTP sink of `make up`
    inbound_metrics_port: int = 9103
    inbound_max_message_bytes: int = 10_000_000
    pec_sender_domains: str = ""
    pec_timeout_s: float = Field(86400.0, gt=0)
    pec_scan_interval_s: float = Field(60.0, gt=0)

    # outbound domain verification backend (api/routes_domains, common/ses_backend): native (own
    # token + DKIM key, checked in DNS) or ses (Amazon SES through boto3). AWS credentials come from
    # boto3's standard chain (AWS_ACCESS_KEY_ID/..., profile, instance role), never from here;
    # ses_region None = boto3's own (AWS_REGION / AWS_DEFAULT_REGION), else us-east-1;
    # ses_endpoint_url: another SES endpoint (a VPC endpoint, or moto's server in tests)
    domain_backend: Literal["native", "ses"] = "native"
    ses_region: str | None = None
    ses_endpoint_url: str | None = None
    ses_timeout_s: float = Field(10.0, gt=0, le=120)

    # VERP (sender/mime, sender/verp, inbound/correlate): set, the envelope sender of every message is
    # bounce+<tenant>=<id>@<sender_verp_domain> and the inbound listener correlates a DSN by the
    # address it was sent to; unset/empty: envelope sender = return_path or from
    sender_verp_domain: str | None = None

    # storage roots (common/storage_roots.py): the operator's named roots of the `storage` attachment
    # mode and of large-file uploads, JSON {"name": "fsspec URL"} or {"name": {"url": ..., "tenants":
    # [...]}}; "{tenant_id}" in a URL is the tenant's id. A tenant picks one by name
    # (large_file_config.storage_root); attachments_storage_url is the root named "default"
    storage_roots_json: str = "{}"

    # internal service credential (common/internal_auth.py): required on every route of the metrics
    # service and of the Prometheus ports of sender/reporter/inbound except a bare GET /health, and
    # sent by every client of the metrics service. Outside dev mode a service refuses to start
    # without it (at least 16 characters); dev mode generates one into <state_dir>/internal.token.
    # prometheus_host: listen address of the sender/reporter/inbound Prometheus ports.
    # The API's public /metrics: delivery counters from a snapshot at most api_metrics_snapshot_s old
    # (one refresh shared by concurrent scrapes); metrics_require_admin: the admin token is required
    internal_token: str | None = None
    prometheus_host: str = "127.0.0.1"
    api_metrics_snapshot_s: float = Field(5.0, ge=0, le=300)
    metrics_require_admin: bool = False

    # wire credentials and unbounded input (sender/smtp_pool, inbound/imap_poller, api/body_limit,
    # api/message_validation, sender/prepare_mime): sender_allow_insecure_auth lets every account send
    # AUTH over an unencrypted SMTP connection (default: only an account with allow_insecure_auth);
    # the IMAP bounce poller verifies certificates against the system CAs plus inbound_imap_ca_file
    # and never sends LOGIN in clear unless inbound_imap_allow_plaintext_login; request bodies are
    # capped before parsing (api_max_body_bytes, webhook/public POST routes api_max_webhook_body_bytes);
    # attachments per message: count, and total decoded size of inline (base64) content, which travels
    # in the command record (the broker's default record limit is 1 MiB; big files go by URL/storage);
    # the sender's attachment bytes being prepared at once (sender_attachments_inflight_bytes)
    sender_allow_insecure_auth: bool = False
    inbound_imap_ca_file: str | None = None
    inbound_imap_allow_plaintext_login: bool = False
    api_max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    api_max_webhook_body_bytes: int = Field(1024 * 1024, ge=1024)
    messages_max_attachments: int = Field(20, ge=0)
    messages_max_attachment_bytes: int = Field(512 * 1024, ge=0)
    sender_attachments_inflight_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)

    # read-your-writes of the message projection (api/projection.py): GET /messages, delete-messages
    # and cleanup-messages wait until the metrics service has loaded the tenant's partitions up to
    # their end offsets at request time, at most projection_wait_timeout_s, else 503
    # projection_unavailable; add-messages waits at most projection_sent_check_wait_s for the
    # tenant's delivery events before its "already sent" check (after it: accepted, the sender's
    # own guard decides and the listing shows the original send)
    projection_wait_timeout_s: float = Field(10.0, gt=0, le=120)
    projection_sent_check_wait_s: float = Field(3.0, ge=0, le=120)

    # SES feedback over SNS (api/routes_webhooks.py, common/sns.py): sns_topic_arns (above) must list
    # the topics; a message whose signed Timestamp is older than sns_max_age_s or ahead of this
    # clock by more than sns_clock_skew_s is refused, and so is a MessageId seen within that window
    # (per API process, at most sns_replay_cache_size ids)
    sns_max_age_s: int = Field(3600, ge=60, le=7 * 86400)
    sns_clock_skew_s: int = Field(300, ge=0, le=3600)
    sns_replay_cache_size: int = Field(200_000, ge=1000, le=10_000_000)

    # domain ownership (api/routes_domains, common/domain_quota): an unverified domain claim stops
    # protecting its name against another tenant's registration this many hours after it was made
    domain_claim_expiry_hours: float = Field(72.0, gt=0)

    # idempotent domain increments (api/routes_domains, sender/domain_ledger): the outbound ledger
    # remembers an increment's Idempotency-Key / X-Postbus-Message-Id, and the message id of every
    # counted send of a registered domain, this long; a repeat within it counts nothing
    domain_idempotency_window_s: int = Field(3600, ge=60, le=7 * 86400)

    # Faust rebalance loss (common/faust_guard.py, docs/architecture.md): the offset guard of the
    # command-consuming agents re-reads and applies records Faust skipped around a rebalance.
    # Off (POSTBUS_FAUST_OFFSET_GUARD=0) only to reproduce the defect
    faust_offset_guard: bool = True

    # sender group commit (sender/group_commit.py, docs/architecture.md "Delivery guarantees"): each SMTP
    # worker hands its outcomes over without waiting for the broker, with at most this many not yet
    # durable; a crash resends at most (1 + this) messages per worker. 16: a commit takes ~50 ms
    # (event ack, then table ack), and with 4 the 32 workers of bench/e2e.py capped at ~1,700 msg/s
    # on 2 idle cores (2,200 with 16; bench/README.md)
    sender_unflushed_per_worker: int = Field(16, ge=1, le=64)

    # provider API (services/api/provider, docs/provider.md): token lifetime; failed token requests
    # per email (per API process) before 429, counted over provider_token_throttle_window_s; the
    # operator's system SMTP account that sends sender-verification and welcome mail (tls: none |
    # starttls | tls; unset host = those routes answer 503); sender-verification link lifetime and
    # the public base URL of its link (default http://api_host:api_port)
    provider_token_ttl_s: int = Field(30 * 86400, ge=1)
    provider_token_max_failures: int = Field(5, ge=1)
    provider_token_throttle_window_s: float = Field(900.0, gt=0)
    system_smtp_host: str | None = None
    system_smtp_port: int = Field(25, ge=1, le=65535)
    system_smtp_user: str | None = None
    system_smtp_password: str | None = None
    system_smtp_from: str = "no-reply@postbus.invalid"
    system_smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    provider_sender_link_ttl_s: int = Field(86400, ge=60)
    provider_public_base_url: str | None = None

    # Faust consumers (sender, reporter; services/common/faust_support.py install_fetch_wait): the
    # longest a fetch waits at the broker for new records (Faust's own: 1,500 ms, which delayed
    # commands by ~1.2 s under a steady flow); an idle consumer sends one empty fetch per this
    faust_fetch_max_wait_ms: int = Field(100, ge=10, le=1500)
    faust_fetch_min_bytes: int = Field(1, ge=1, le=1048576)

    # the event loop of the sender and reporter (faust_support.use_event_loop; inbound stays on asyncio);
    # the API and metrics run under uvicorn, which picks uvloop itself when it is installed
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @property
    def clickhouse(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
