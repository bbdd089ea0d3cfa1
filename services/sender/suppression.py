"""The suppression check: a tenant's suppressed addresses are never sent to.

The list is the compacted topic ``postbus.config.suppression-list`` (key ``tenant/address``,
address lowercased), held here in a :class:`ConfigView` that ``services/sender/engagement.py``
starts. If every recipient of a message is suppressed the message ends with an ``error`` event
whose reason is ``suppressed: <reason> (<address>)``. If only some are, they are dropped from the
envelope (and from the To/Cc headers) and the message goes to the others; the dropped addresses are
logged and kept in ``ctx.extra["suppressed"]``. Hard bounces, complaints and unsubscribes are
added automatically (engagement.py); tenants manage the list through ``/suppressions``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.config_view import ConfigView
from services.common.settings import get_settings
from services.common.topics import CONFIG_SUPPRESSION_LIST
from services.sender import pipeline
from services.sender.addresses import parse_item

log = logging.getLogger("postbus.sender.suppression")

LOAD_TIMEOUT_S = 120.0
# tenant -> its suppressed keys: most messages belong to tenants with none and skip the parsing
_by_tenant: dict[str, set[str]] = {}


def _on_change(key: str, value: dict[str, Any] | None) -> None:
    tenant = key.partition("/")[0]
    if value is not None:
        _by_tenant.setdefault(tenant, set()).add(key)
    elif tenant in _by_tenant:
        _by_tenant[tenant].discard(key)
        if not _by_tenant[tenant]:
            del _by_tenant[tenant]


view = ConfigView(get_settings().kafka_bootstrap, CONFIG_SUPPRESSION_LIST, "SuppressionEntry", on_change=_on_change)


def entry_key(tenant_id: str, address: str) -> str:
    return f"{tenant_id}/{address.strip().lower()}"


def split(message: dict[str, Any], lookup: Any) -> tuple[dict[str, list[str]], list[tuple[str, dict[str, Any]]]]:
    """Per field (to/cc/bcc) the entries to keep, and the (address, entry) pairs that are suppressed."""
    keep: dict[str, list[str]] = {}
    dropped: list[tuple[str, dict[str, Any]]] = []
    for field in ("to", "cc", "bcc"):
        keep[field] = []
        for raw in message.get(field) or []:
            addrs = [a for _, a in parse_item(raw) if a]
            entry = next((e for a in addrs if (e := lookup(entry_key(message["tenant_id"], a)))), None)
            if entry is None:
                keep[field].append(raw)
            else:
                dropped.append((addrs[0].lower(), entry))
    return keep, dropped


def reason_text(address: str, entry: dict[str, Any]) -> str:
    return f"suppressed: {entry['reason'].replace('_', ' ')} ({address})"


async def check(ctx: pipeline.SendContext) -> pipeline.Decision | None:
    if not view.ready.is_set():
        await asyncio.wait_for(view.ready.wait(), LOAD_TIMEOUT_S)  # never send before knowing the list
    if ctx.message["tenant_id"] not in _by_tenant:
        return None
    keep, dropped = split(ctx.message, view.get)
    if not dropped:
        return None
    if not any(keep.values()):
        address, entry = dropped[0]
        return pipeline.Decision.reject(reason_text(address, entry))
    # the worker sends to the message dict's own lists: drop the suppressed entries there
    for field, entries in keep.items():
        ctx.message[field] = entries
    ctx.extra["suppressed"] = [a for a, _ in dropped]
    log.info("suppressed recipients dropped", extra={"tenant_id": ctx.message["tenant_id"],
                                                     "id": ctx.message["id"], "dropped": len(dropped)})
    return None
