"""``postbus state-at TENANT TIME``: a tenant's configuration and queue at a past time, from the log."""

from __future__ import annotations

from typing import Any

import click
from aiokafka import TopicPartition

from services.cli import history
from services.cli.context import Ctx, emit, json_option, parse_time, progress_bar, run
from services.cli.kafka import command_entry, consumer, partitions_of, read_snapshot, tenant_partition
from services.common.avro import DecodeError, codec
from services.common.topics import COMMANDS, CONFIG_ACCOUNTS, CONFIG_SUSPENSIONS, CONFIG_TENANTS, EVENTS


async def collect_state(ctx: Ctx, tenant_id: str, at_ms: int) -> dict[str, Any]:
    state = history.TenantState(tenant_id)
    c_ = codec()
    timeline: list[tuple[int, int, Any]] = []  # (ts, order, item) merged across commands and events
    configs: list[tuple[str, str, dict[str, Any] | None]] = []
    with progress_bar(f"rebuilding {tenant_id}") as bar:
        async with consumer(ctx.bootstrap) as c:
            for topic in (COMMANDS, EVENTS):
                tp = await tenant_partition(c, topic, tenant_id)
                task = bar.add_task(topic, total=None)

                def show(done: int, total: int, task: Any = task) -> None:
                    bar.update(task, completed=done, total=total)

                async for rec in read_snapshot(c, [tp], progress=show):
                    if rec.timestamp > at_ms or rec.key != tenant_id.encode():
                        continue
                    if topic == COMMANDS:
                        entry = command_entry(rec, history.STATE_COMMANDS)
                        if entry is not None and entry["ts"] <= at_ms:
                            timeline.append((entry["ts"], 0, entry))
                    else:
                        try:
                            name, body = c_.decode(rec.value)
                        except DecodeError:
                            continue
                        if name == "DeliveryEvent" and body["ts"] <= at_ms:
                            timeline.append((body["ts"], 1, body))
            kinds = {CONFIG_TENANTS: "tenant", CONFIG_ACCOUNTS: "account", CONFIG_SUSPENSIONS: "suspension"}
            for topic, kind in kinds.items():
                tps = [TopicPartition(topic, p) for p in await partitions_of(c, topic)]
                async for rec in read_snapshot(c, tps):
                    key = (rec.key or b"").decode(errors="replace")
                    if rec.timestamp > at_ms or not (key == tenant_id or key.startswith(tenant_id + "/")):
                        continue
                    value = None
                    if rec.value is not None:
                        try:
                            value = c_.decode(rec.value)[1]
                        except DecodeError:
                            continue
                    configs.append((kind, key, value))
    for _, order, item in sorted(timeline, key=lambda t: (t[0], t[1])):
        if order == 0:
            state.apply_command(item)
        else:
            state.apply_event(item)
    for kind, key, value in configs:
        state.apply_config(kind, key, value)
    return state.to_json(at_ms)


@click.command("state-at")
@click.argument("tenant_id")
@click.argument("when", metavar="TIME")
@json_option("One JSON document instead of the summary.")
@click.pass_obj
def state_at(ctx: Ctx, tenant_id: str, when: str, as_json: bool) -> None:
    """The tenant's configuration (tenant, accounts with secrets redacted, suspensions) and queue
    (pending message ids) as they were at TIME (ISO 8601 or unix seconds), rebuilt from the log:
    the tenant's commands and events with a timestamp up to TIME, and the compacted config topics.

    Example: postbus state-at acme 2026-11-27T18:00:00Z"""
    at_ms = parse_time(when, "TIME")
    state = run(collect_state(ctx, tenant_id, at_ms))
    if as_json:
        emit(state)
    else:
        for line in history.render_state(state):
            click.echo(line)
