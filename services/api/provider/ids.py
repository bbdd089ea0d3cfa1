"""The provider API's integer ids (users, senders, templates, lists, members, campaigns).

One counter per kind, a ``ProviderCounter`` record on the compacted ``postbus.config.provider-ids``
(key = kind), advanced by a fenced read-modify-write (``CommandWriter.update_config``, shard
``provider-ids``): every API replica writes the counters through the same transactional id, so a
commit proves no other replica advanced them since this one caught up: two replicas never hand
out the same id. Each allocation is a ``provider.id.allocate`` command in the same transaction.
Ids are never reused (a crash after allocating leaves a gap, nothing else)."""

from __future__ import annotations

from typing import Any

from services.api.commands import Actor, ConfigRecord, ConfigWrite
from services.common.topics import CONFIG_PROVIDER_IDS

SHARD = "provider-ids"
KINDS = ("user", "sender", "template", "list", "member", "campaign")


async def next_ids(st: Any, kind: str, count: int, tenant_id: str | None = None,
                   actor: Actor | None = None) -> int:
    """Allocate ``count`` consecutive ids of ``kind``; returns the first one."""
    if kind not in KINDS:
        raise ValueError(f"unknown id kind {kind!r}")
    if count < 1:
        raise ValueError("count must be at least 1")
    view = st.provider.ids
    first = 0

    def build() -> ConfigWrite:
        nonlocal first
        current = view.get(kind)
        last = int(current["value"]) if current else 0
        first = last + 1
        rec = {"kind": kind, "value": last + count}
        return ConfigWrite("provider.id.allocate", tenant_id, actor or Actor("admin"),
                           "provider id allocator", "ProviderCounter", rec,
                           [ConfigRecord(CONFIG_PROVIDER_IDS, kind, "ProviderCounter", rec)])

    offsets = await st.writer.update_config(SHARD, view.catch_up, build)
    await view.wait_for(offsets[CONFIG_PROVIDER_IDS], st.settings.write_timeout_s)
    return first


async def next_id(st: Any, kind: str, tenant_id: str | None = None, actor: Actor | None = None) -> int:
    return await next_ids(st, kind, 1, tenant_id, actor)
