"""Everything the API process holds: settings, the command writer, the config views, the
metrics-service client (which sends the internal service credential on every call). Built once at
start-up (see app.lifespan) and reached through ``deps``."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.api.commands import CommandWriter
from services.api.sent_filter import SentFilter
from services.common.apikeys import pepper_from
from services.common.config_view import ConfigView
from services.common.crypto import SecretBox, load_secret_box
from services.common.internal_auth import auth_headers, load_internal_token
from services.common.settings import Settings
from services.common.topics import (
    CONFIG_ACCOUNTS,
    CONFIG_APIKEYS,
    CONFIG_INSTANCE,
    CONFIG_SUSPENSIONS,
    CONFIG_TENANTS,
    STATUS_SYNC,
)

log = logging.getLogger("postbus.api")


def account_key(tenant_id: str, account_id: str) -> str:
    return f"{tenant_id}/{account_id}"


def load_admin_token(settings: Settings) -> str:
    if settings.admin_token:
        return settings.admin_token
    if not settings.dev:
        raise RuntimeError("POSTBUS_ADMIN_TOKEN is not set (or set POSTBUS_DEV=1 for a local run)")
    path = Path(settings.state_dir) / "admin.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _provider_views(bootstrap: str) -> Any:
    from services.api.provider.views import ProviderViews  # here: the provider package imports this module

    return ProviderViews(bootstrap)


@dataclass
class ApiState:
    settings: Settings
    admin_token: str
    box: SecretBox
    pepper: bytes
    writer: CommandWriter
    tenants: ConfigView
    accounts: ConfigView
    apikeys: ConfigView
    metrics: httpx.AsyncClient
    started: float = field(default_factory=time.time)
    # instance-wide config (key "instance"); see routes_admin
    instance: ConfigView | None = None
    # per-tenant suspended batches (key tenant_id); see routes_lifecycle
    suspensions: ConfigView | None = None
    # reporter's per-tenant sync status (key tenant_id); see routes_messages_read
    sync_status: ConfigView | None = None
    # the delivery counters snapshot of the public /metrics (gmp_metrics.CountersSnapshot, made lazily)
    gmp_snapshot: Any = None
    # add-messages' "already sent" pre-check (sent_filter.SentFilter, from postbus.events)
    sent_filter: Any = None
    # provider API projections (services/api/provider/views.ProviderViews: users, tokens, senders, ...)
    provider: Any = None

    @classmethod
    def build(cls, settings: Settings) -> ApiState:
        box = load_secret_box(settings)
        key_material = settings.secret_key or (Path(settings.state_dir) / "secret.key").read_text()
        bootstrap = settings.kafka_bootstrap
        internal_token = load_internal_token(settings)  # outside dev mode: no start without it
        return cls(
            settings=settings,
            admin_token=load_admin_token(settings),
            box=box,
            pepper=pepper_from(key_material.strip()),
            # a transactional id unique per API process (two replicas must not fence each other)
            writer=CommandWriter(bootstrap,
                                 f"postbus-api-{settings.instance}-{socket.gethostname()}-{settings.api_port}",
                                 settings.write_timeout_s),
            tenants=ConfigView(bootstrap, CONFIG_TENANTS, "Tenant"),
            accounts=ConfigView(bootstrap, CONFIG_ACCOUNTS, "Account"),
            apikeys=ConfigView(bootstrap, CONFIG_APIKEYS, "ApiKey"),
            metrics=httpx.AsyncClient(base_url=settings.metrics_url, timeout=10.0,
                                      headers=auth_headers(internal_token)),
            instance=ConfigView(bootstrap, CONFIG_INSTANCE, "Instance"),
            suspensions=ConfigView(bootstrap, CONFIG_SUSPENSIONS, "Suspension"),
            sync_status=ConfigView(bootstrap, STATUS_SYNC, "SyncStatus"),
            sent_filter=SentFilter(bootstrap),
            provider=_provider_views(bootstrap),
        )

    async def start(self) -> None:
        await self.writer.start()
        await asyncio.gather(self.tenants.start(), self.accounts.start(), self.apikeys.start())
        if self.instance is not None:
            await self.instance.start()
        if self.suspensions is not None:
            await self.suspensions.start()
        if self.sync_status is not None:
            await self.sync_status.start()
        if self.sent_filter is not None:
            await self.sent_filter.start()  # loads in the background
        if self.provider is not None:
            await self.provider.start()

    async def stop(self) -> None:
        await asyncio.gather(self.tenants.stop(), self.accounts.stop(), self.apikeys.stop(),
                             return_exceptions=True)
        if self.instance is not None:
            await self.instance.stop()
        if self.suspensions is not None:
            await self.suspensions.stop()
        if self.sync_status is not None:
            await self.sync_status.stop()
        if self.sent_filter is not None:
            await self.sent_filter.stop()
        if self.provider is not None:
            await self.provider.stop()
        await self.writer.stop()
        await self.metrics.aclose()

    async def wait_visible(self, offsets: dict[str, dict[int, int]]) -> None:
        """Read-your-writes: return once every view has applied the given records."""
        views = {v.topic: v for v in (self.tenants, self.accounts, self.apikeys, self.instance,
                                           self.suspensions) if v is not None}
        await asyncio.gather(*(views[t].wait_for(o, self.settings.write_timeout_s) for t, o in offsets.items()))
