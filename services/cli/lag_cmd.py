"""``postbus lag``: committed offset, end offset and lag per consumer group and partition."""

from __future__ import annotations

from typing import Any

import click
from aiokafka import TopicPartition

from services.cli.context import Ctx, json_option, print_rows, run
from services.cli.kafka import admin_client, consumer


async def collect_lag(ctx: Ctx, group_filter: str | None) -> list[dict[str, Any]]:
    admin = await admin_client(ctx.bootstrap)
    rows: list[dict[str, Any]] = []
    try:
        groups = sorted(g[0] for g in await admin.list_consumer_groups())
        if group_filter:
            groups = [g for g in groups if g == group_filter]
        committed: dict[str, dict[TopicPartition, int]] = {}
        for g in groups:
            offs = await admin.list_consumer_group_offsets(g)
            committed[g] = {tp: om.offset for tp, om in offs.items() if om.offset >= 0}
    finally:
        await admin.close()
    tps = sorted({tp for offs in committed.values() for tp in offs})
    if not tps:
        return rows
    async with consumer(ctx.bootstrap, committed_only=False) as c:  # high watermark, like the lag gauge
        ends = await c.end_offsets(tps)
    for g in groups:
        for tp in sorted(committed[g]):
            end = ends.get(tp, 0)
            rows.append({"group": g, "topic": tp.topic, "partition": tp.partition, "committed": committed[g][tp],
                         "end": end, "lag": max(0, end - committed[g][tp])})
    return rows


@click.command()
@click.option("--group", default=None, help="Only this consumer group.")
@json_option()
@click.pass_obj
def lag(ctx: Ctx, group: str | None, as_json: bool) -> None:
    """Per consumer group and partition: committed offset, end offset (high watermark) and lag.
    Covers every group that commits to Kafka (postbus-sender, postbus-reporter, postbus-metrics:
    the metrics ingest's own offsets live in ClickHouse next to its rows and its Kafka commit
    follows them); the config views have no group (see the postbus_consumer_lag gauge).

    Example: postbus lag --group postbus-sender"""
    rows = run(collect_lag(ctx, group))
    if group and not rows:
        raise click.ClickException(f"consumer group {group!r} has no committed offsets")
    print_rows(rows, as_json,
               f"{'GROUP':<28} {'TOPIC':<44} {'PART':>4} {'COMMITTED':>10} {'END':>10} {'LAG':>8}",
               lambda r: f"{r['group']:<28} {r['topic']:<44} {r['partition']:>4} {r['committed']:>10} "
                         f"{r['end']:>10} {r['lag']:>8}")
    if not as_json:
        total = sum(r["lag"] for r in rows)
        click.echo(f"total lag: {total} records in {len({r['group'] for r in rows})} group(s)")
