"""``postbus trace TENANT MESSAGE_ID``: one message's whole life, read from the tenant's partitions."""

from __future__ import annotations

from typing import Any

import click

from services.cli import history
from services.cli.context import Ctx, emit, json_option, optional_time, progress_bar, run, since_option
from services.cli.kafka import command_entry, consumer, read_snapshot, tenant_partition
from services.common.avro import DecodeError, codec
from services.common.topics import COMMANDS, EVENTS, REPORTS


async def collect_trace(ctx: Ctx, tenant_id: str, message_id: str, since_ms: int | None = None
                        ) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    c_ = codec()
    with progress_bar(f"reading {tenant_id}'s partitions") as bar:
        async with consumer(ctx.bootstrap) as c:
            for topic in (COMMANDS, EVENTS, REPORTS):
                tp = await tenant_partition(c, topic, tenant_id)
                task = bar.add_task(topic, total=None)
                start = None
                if since_ms is not None:  # the first record at or after since (none: nothing to read)
                    found = (await c.offsets_for_times({tp: since_ms})).get(tp)
                    start = {tp: found.offset if found is not None else (await c.end_offsets([tp]))[tp]}

                def show(done: int, total: int, task: Any = task) -> None:
                    bar.update(task, completed=done, total=total)

                async for rec in read_snapshot(c, [tp], start=start, progress=show):
                    if rec.key is not None and rec.key != tenant_id.encode():
                        continue
                    if topic == COMMANDS:
                        entry = command_entry(rec, history.TRACE_COMMANDS)
                        if entry is not None:
                            items.extend(history.command_items(entry, tenant_id, message_id))
                        continue
                    try:
                        name, body = c_.decode(rec.value)
                    except DecodeError:
                        continue
                    if topic == EVENTS and name == "DeliveryEvent":
                        item = history.event_item(body, rec, tenant_id, message_id)
                        if item is not None:
                            items.append(item)
                    elif topic == REPORTS and name == "ReportAck":
                        items.extend(history.report_items(body, rec, tenant_id, message_id))
    return history.sort_timeline(items)


@click.command()
@click.argument("tenant_id")
@click.argument("message_id")
@json_option("One JSON document instead of the readable timeline.")
@since_option("Read only records from this time on (ISO 8601 or unix seconds): faster on long partitions.")
@click.pass_obj
def trace(ctx: Ctx, tenant_id: str, message_id: str, as_json: bool, since: str | None) -> None:
    """The whole life of one message, from the topics: the messages.add command (offset, time, actor,
    route), every event (attempt, SMTP code, error), the report acknowledgements, and
    bounces/complaints/opens/clicks. Reads the tenant's partitions only.

    Example: postbus trace acme order-4711"""
    since_ms = optional_time(since, "--since")
    items = run(collect_trace(ctx, tenant_id, message_id, since_ms))
    if not items:
        raise click.ClickException(f"no record of message {message_id!r} of tenant {tenant_id!r} on the topics")
    if as_json:
        emit({"tenant_id": tenant_id, "message_id": message_id,
              "timeline": [{**i, "at": history.iso(i["ts"])} for i in items]})
    else:
        for line in history.render_timeline(tenant_id, message_id, items):
            click.echo(line)
