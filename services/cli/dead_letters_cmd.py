"""``postbus dead-letters``: list postbus.deadletter and re-append the original records."""

from __future__ import annotations

from typing import Any

import click
from aiokafka import TopicPartition

from services.cli import history
from services.cli.context import (
    Ctx,
    confirm,
    emit,
    err,
    json_option,
    optional_time,
    progress_bar,
    require_yes_or_terminal,
    run,
    since_option,
    yes_option,
)
from services.cli.kafka import consumer, dead_letter_summary, partitions_of, producer, read_snapshot
from services.common.avro import DecodeError, codec
from services.common.topics import DEADLETTER


async def collect_dead_letters(ctx: Ctx, source_topic: str | None, offsets: tuple[int, ...],
                               since_ms: int | None) -> list[tuple[Any, dict[str, Any]]]:
    """(dead-letter record, its decoded body with the original key/value) for every match."""
    out: list[tuple[Any, dict[str, Any]]] = []
    with progress_bar("reading dead letters") as bar:
        task = bar.add_task("dl", total=None)
        async with consumer(ctx.bootstrap) as c:
            tps = [TopicPartition(DEADLETTER, p) for p in await partitions_of(c, DEADLETTER)]

            def show(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            async for rec in read_snapshot(c, tps, progress=show):
                if offsets and rec.offset not in offsets:
                    continue
                try:
                    _, body = codec().decode(rec.value, expect="DeadLetter")
                except DecodeError:
                    continue
                if source_topic and body["source_topic"] != source_topic:
                    continue
                if since_ms is not None and body["ts"] < since_ms:
                    continue
                out.append((rec, body))
    return out


async def replay_dead_letters(ctx: Ctx, items: list[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    async with producer(ctx.bootstrap) as p:
        with progress_bar("re-appending") as bar:
            task = bar.add_task("replay", total=len(items))
            for rec, body in items:
                md = await p.send_and_wait(body["source_topic"], value=body["value"], key=body.get("key"))
                done.append({"dead_letter_offset": rec.offset, "topic": body["source_topic"],
                             "partition": md.partition, "offset": md.offset})
                bar.advance(task)
    return done


@click.command("dead-letters")
@click.option("--topic", "source_topic", default=None, help="Only records dead-lettered from this topic.")
@click.option("--offset", "offsets", type=click.IntRange(min=0), multiple=True,
              help="Only the dead letter at this offset of postbus.deadletter (repeatable).")
@since_option("Only records dead-lettered from this time on.")
@click.option("--replay", is_flag=True, help="Re-append each selected original record to its source topic.")
@yes_option("Confirm --replay without a prompt.")
@json_option()
@click.pass_obj
def dead_letters(ctx: Ctx, source_topic: str | None, offsets: tuple[int, ...], since: str | None, replay: bool,
                 yes: bool, as_json: bool) -> None:
    """List postbus.deadletter records (source topic/partition/offset, consumer, reason), and with
    --replay re-append the original records (same key, same bytes) to their topics, e.g. after a
    consumer was fixed. The original payloads are never printed (only their schema and size).

    Example: postbus dead-letters --topic postbus.commands --replay --yes"""
    since_ms = optional_time(since, "--since")
    if replay:
        require_yes_or_terminal(yes, "--replay re-appends records to their topics")
    items = run(collect_dead_letters(ctx, source_topic, offsets, since_ms))
    for rec, body in items:
        row = {"offset": rec.offset, **dead_letter_summary(body)}
        if as_json:
            emit(row)
        else:
            click.echo(f"@{row['offset']}  {history.iso(row['ts'])}  {row['source_topic']}[{row['source_partition']}]"
                       f"@{row['source_offset']}  consumer={row['consumer']}  schema={row['value_schema']}  "
                       f"reason={row['reason']!r}")
    if not replay:
        if not as_json:
            err.print(f"{len(items)} dead letter(s)")
        return
    replayable = [(r, b) for r, b in items if b.get("value") is not None and b["source_topic"] != DEADLETTER]
    if not replayable:
        raise click.ClickException("no dead letter to replay matches")
    confirm(yes, f"re-append {len(replayable)} record(s) to their topics?", "not confirmed: nothing re-appended")
    for d in run(replay_dead_letters(ctx, replayable)):
        if as_json:
            emit({"replayed": d})
        else:
            click.echo(f"replayed dead letter @{d['dead_letter_offset']} -> {d['topic']}[{d['partition']}]"
                       f"@{d['offset']}")
