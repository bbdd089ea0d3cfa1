"""``postbus replay views``: rebuild the API's config views (tenants, accounts, API keys, instance,
suspensions, sync status, provider users/tokens/senders/templates/lists/members/campaigns, domains,
suppressions) in this process from their compacted topics, and verify them against what the admin
API holds.

The API answers ``GET /admin/views/digest?salt=`` (services/api/routes_admin.py): each view, caught
up with its topic, with the offsets it holds and a salted digest per record
(services/common/view_digest.py; no record leaves the API). The CLI reads each topic from the
beginning up to exactly those offsets, applies upserts and tombstones as the API's ConfigView does,
and compares digest by digest; and it compares the tenant list (``GET /tenants``) and each tenant's
account list (``GET /accounts``) with the rebuilt tenants and accounts."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiokafka import TopicPartition

from services.cli.context import Ctx, get_json, progress_bar, tenant_ids
from services.cli.kafka import consumer, partitions_of, read_snapshot
from services.common import view_digest
from services.common.avro import DecodeError, codec
from services.common.topics import CONFIG_ACCOUNTS, CONFIG_TENANTS

MAX_TENANT_LISTS = 500  # account lists compared (one request each)


def new_salt() -> str:
    return secrets.token_hex(16)


def api_answers(http: Any, salt: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the API's answers, per topic: its schema and the offsets its view holds)."""
    deadline = time.monotonic() + 60
    doc = get_json(http, "/admin/views/digest", {"salt": salt}, deadline)
    answers: dict[str, Any] = {}
    held: dict[str, dict[str, Any]] = {}
    for v in doc["views"]:
        held[v["topic"]] = {"schema": v["schema"], "applied": v["applied"]}
        answers[f"{v['topic']} count"] = v["count"]
        for key, d in v["digests"].items():
            answers[f"{v['topic']} {key}"] = d
    tenants = tenant_ids(http)
    answers["GET /tenants"] = tenants
    for t in tenants[:MAX_TENANT_LISTS]:
        accounts = get_json(http, "/accounts", {"tenant_id": t}, deadline)["accounts"]
        answers[f"GET /accounts?tenant_id={t}"] = sorted(a["id"] for a in accounts)
    return answers, held


async def rebuild(ctx: Ctx, held: dict[str, dict[str, Any]], exact: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """topic -> key -> record, each view rebuilt from its topic: up to the offsets the API's view
    holds (``exact``), else up to the end offsets now."""
    views: dict[str, dict[str, dict[str, Any]]] = {}
    dec = codec()
    with progress_bar("rebuilding the views") as bar:
        async with consumer(ctx.bootstrap) as c:
            for topic, info in sorted(held.items()):
                tps = [TopicPartition(topic, p) for p in await partitions_of(c, topic)]
                end = {tp: int(info["applied"].get(str(tp.partition), 0)) for tp in tps} if exact else None
                task = bar.add_task(topic, total=None)

                def show(done: int, total: int, task: Any = task) -> None:
                    bar.update(task, completed=done, total=total)

                items: dict[str, dict[str, Any]] = {}
                async for rec in read_snapshot(c, tps, end=end, progress=show):
                    key = rec.key.decode() if rec.key else ""
                    if rec.value is None:
                        items.pop(key, None)
                        continue
                    try:
                        _, value = dec.decode(rec.value, expect=info["schema"])
                    except DecodeError:
                        continue  # the API's view dead-letters it and keeps the previous record
                    items[key] = value
                views[topic] = items
    return views


def rebuilt_answers(views: dict[str, dict[str, dict[str, Any]]], salt: str, tenants: list[str]) -> dict[str, Any]:
    """The same answers as :func:`api_answers`, from the rebuilt views."""
    salt_bytes = view_digest.parse_salt(salt)
    answers: dict[str, Any] = {}
    for topic, items in views.items():
        answers[f"{topic} count"] = len(items)
        for key, d in view_digest.view_digests(salt_bytes, items).items():
            answers[f"{topic} {key}"] = d
    answers["GET /tenants"] = sorted(views.get(CONFIG_TENANTS, {}))
    accounts = views.get(CONFIG_ACCOUNTS, {})
    for t in tenants[:MAX_TENANT_LISTS]:
        answers[f"GET /accounts?tenant_id={t}"] = sorted(a["id"] for a in accounts.values() if a.get("tenant_id") == t)
    return answers
