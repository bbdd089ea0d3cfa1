"""``postbus topics``: every topic with its partitions, retention and end offsets."""

from __future__ import annotations

from typing import Any

import click
from aiokafka import TopicPartition

from services.cli.context import Ctx, json_option, print_rows, run
from services.cli.kafka import admin_client, consumer, partitions_of


def _configs_of(responses: list[Any]) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for resp in responses:
        for res in resp.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = res[3], res[4]
            out[name] = {e[0]: e[1] for e in entries}
    return out


async def collect_topics(ctx: Ctx, only: str | None) -> list[dict[str, Any]]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = await admin_client(ctx.bootstrap)
    try:
        names = sorted(n for n in await admin.list_topics() if not n.startswith("__"))
        if only:
            names = [n for n in names if n == only]
        if not names:
            return []
        configs = _configs_of(await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n, configs=None) for n in names]))
    finally:
        await admin.close()
    rows: list[dict[str, Any]] = []
    async with consumer(ctx.bootstrap, committed_only=False) as c:
        parts = {n: await partitions_of(c, n) for n in names}
        tps = [TopicPartition(n, p) for n in names for p in parts[n]]
        begins = await c.beginning_offsets(tps)
        ends = await c.end_offsets(tps)
    for n in names:
        cfg = configs.get(n, {})
        tp_list = [TopicPartition(n, p) for p in parts[n]]
        rows.append({
            "topic": n, "partitions": len(tp_list),
            "cleanup_policy": cfg.get("cleanup.policy"), "retention_ms": _int(cfg.get("retention.ms")),
            "retention_bytes": _int(cfg.get("retention.bytes")),
            "end_offsets": {str(tp.partition): ends[tp] for tp in tp_list},
            "records": sum(ends[tp] - begins[tp] for tp in tp_list),  # offsets held (markers included)
        })
    return rows


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _retention(ms: int | None, policy: str | None) -> str:
    if policy and "compact" in policy and "delete" not in policy:
        return "compacted"
    if ms is None:
        return "?"
    if ms < 0:
        return "forever"
    if ms % 86_400_000 == 0:
        return f"{ms // 86_400_000}d"
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    return f"{ms}ms"


def _line(r: dict[str, Any]) -> str:
    ends = " ".join(f"{p}:{o}" for p, o in r["end_offsets"].items())
    return (f"{r['topic']:<46} {r['partitions']:>4} {_retention(r['retention_ms'], r['cleanup_policy']):>10} "
            f"{r['records']:>10}  {ends}")


@click.command()
@click.option("--topic", default=None, help="Only this topic.")
@json_option()
@click.pass_obj
def topics(ctx: Ctx, topic: str | None, as_json: bool) -> None:
    """Every topic: partitions, cleanup policy and retention, end offsets.

    Example: postbus topics --topic postbus.commands"""
    rows = run(collect_topics(ctx, topic))
    if topic and not rows:
        raise click.ClickException(f"topic {topic!r} does not exist")
    print_rows(rows, as_json, f"{'TOPIC':<46} {'PART':>4} {'RETENTION':>10} {'OFFSETS':>10}  END OFFSETS", _line)
