"""``postbus tail events|commands``: records of the event or command topic as redacted JSON lines."""

from __future__ import annotations

import sys

import click
from aiokafka import TopicPartition

from services.cli.context import Ctx, emit, run, tenant_option
from services.cli.kafka import consumer, follow, partitions_of, read_snapshot, record_json, tenant_partition
from services.common.topics import COMMANDS, EVENTS


@click.command()
@click.argument("stream", type=click.Choice(["events", "commands"]))
@tenant_option("Only this tenant (reads its partition only).")
@click.option("--from-beginning", is_flag=True, help="Start at the beginning of the topic, not at its end.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N records.")
@click.option("--follow/--no-follow", "keep_following", default=True, show_default=True,
              help="Wait for new records; --no-follow stops at the end offsets taken at start.")
@click.pass_obj
def tail(ctx: Ctx, stream: str, tenant_id: str | None, from_beginning: bool, limit: int | None,
         keep_following: bool) -> None:
    """Print records of postbus.events or postbus.commands, decoded from Avro, one JSON line each
    (secrets redacted).

    Example: postbus tail events --tenant acme --from-beginning --limit 20"""
    topic = EVENTS if stream == "events" else COMMANDS

    async def go() -> int:
        n = 0
        async with consumer(ctx.bootstrap) as c:
            if tenant_id:
                tps = [await tenant_partition(c, topic, tenant_id)]
            else:
                tps = [TopicPartition(topic, p) for p in await partitions_of(c, topic)]
            if keep_following:
                records = follow(c, tps, from_beginning=from_beginning)
            else:
                start = None if from_beginning else await c.end_offsets(tps)
                records = read_snapshot(c, tps, start=start)
            async for rec in records:
                if tenant_id and rec.key != tenant_id.encode():
                    continue
                shown = record_json(rec)
                body = shown.get("record") or {}
                if tenant_id and isinstance(body, dict) and body.get("tenant_id") not in (tenant_id, None):
                    continue
                emit(shown)
                sys.stdout.flush()
                n += 1
                if limit is not None and n >= limit:
                    break
        return n

    try:
        run(go())
    except KeyboardInterrupt:
        pass
