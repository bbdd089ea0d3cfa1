"""Helpers shared by the provider route modules: time, email checks, writes with read-your-writes."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from services.api.commands import ConfigRecord, ConfigWrite
from services.api.provider.auth import ProviderUser
from services.api.state import ApiState

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+)$")


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def valid_email(address: str) -> bool:
    return len(address) <= 254 and bool(_EMAIL.match(address))


def email_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


async def write(st: ApiState, user: ProviderUser, ctype: str, route: str, schema: str, payload: dict[str, Any],
                records: list[ConfigRecord]) -> None:
    """One command + its provider records in one transaction; returns once this process reads them."""
    offsets = await st.writer.append_config(ctype, user.tenant_id, user.actor, route, schema, payload, records)
    await st.provider.wait_visible(offsets, st.settings.write_timeout_s)


async def write_fenced(st: ApiState, shard: str, catch_up: Any, build: Any) -> None:
    """A read-modify-write (``build`` decides on the caught-up view, e.g. a uniqueness check) that stays
    correct with several API replicas (CommandWriter.update_config), then read-your-writes."""
    offsets = await st.writer.update_config(shard, catch_up, build)
    await st.provider.wait_visible(offsets, st.settings.write_timeout_s)


__all__ = ["ConfigRecord", "ConfigWrite", "email_domain", "iso", "now_ms", "valid_email", "write", "write_fenced"]
