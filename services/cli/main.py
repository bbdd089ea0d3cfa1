"""``postbus``: the operators' command line (docs/cli.md).

Talks to the admin API (``--api``, ``--admin-token``) for what the API serves (command-log export,
analytics replay) and reads Kafka directly (``--bootstrap``) for the rest, with group-less
``read_committed`` consumers (no service's offsets move). Secrets are redacted as in the API's
command-log export (``services/common/redaction.py``); the admin token is never printed.

Exit codes: 0 success, 1 failure (API error, broker unreachable, ...), 2 usage error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.cli import history
from services.cli.kafka import (
    KafkaUnavailable,
    command_entry,
    consumer,
    dead_letter_summary,
    follow,
    partitions_of,
    read_snapshot,
    record_json,
    tenant_partition,
)
from services.common.avro import DecodeError, codec
from services.common.topics import (
    COMMANDS,
    CONFIG_ACCOUNTS,
    CONFIG_SUSPENSIONS,
    CONFIG_TENANTS,
    DEADLETTER,
    EVENTS,
    REPORTS,
)

T = TypeVar("T")
err = Console(stderr=True, highlight=False)


def local_token(name: str) -> str | None:
    """A token ``make up`` left in the local state folder (``$POSTBUS_STATE_DIR``, default
    ``.state``): ``admin.token``, ``internal.token``; None when there is none."""
    path = Path(os.environ.get("POSTBUS_STATE_DIR") or ".state") / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass
class Ctx:
    api: str
    admin_token: str | None
    bootstrap: str
    metrics_url: str | None
    internal_token: str | None

    def http(self, timeout: float = 30.0) -> httpx.Client:
        if not self.admin_token:
            raise click.UsageError("this command needs the admin token: --admin-token or POSTBUS_ADMIN_TOKEN")
        return httpx.Client(base_url=self.api.rstrip("/"), headers={"X-API-Token": self.admin_token},
                            timeout=timeout)


def run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except KafkaError as exc:
        raise click.ClickException(f"Kafka error: {type(exc).__name__}: {exc}") from None


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str))


def api_failure(r: httpx.Response) -> click.ClickException:
    """The API's error envelope as a message (never the request, so never the token)."""
    try:
        body = r.json()
        e = body.get("error") if isinstance(body, dict) else None
        if isinstance(e, dict):
            return click.ClickException(f"the API answered {r.status_code} {e.get('code')}: {e.get('message')}")
        if isinstance(body, dict) and "detail" in body:
            return click.ClickException(f"the API answered {r.status_code}: {body['detail']}")
    except ValueError:
        pass
    return click.ClickException(f"the API answered {r.status_code}")


@contextlib.contextmanager
def api_call(ctx: Ctx) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise click.ClickException(f"the API at {safe_url(ctx.api)} did not answer ({type(exc).__name__})") from None


def safe_url(url: str) -> str:
    """A URL without credentials, for messages."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(the given URL)"


def parse_time(value: str, param: str) -> int:
    """ISO 8601 (naive = UTC), or unix seconds (values above 1e11 are milliseconds): epoch ms."""
    v = value.strip()
    try:
        num = float(v)
    except ValueError:
        pass
    else:
        if num < 0 or num != num or num in (float("inf"), float("-inf")):
            raise click.BadParameter("must be a time after 1970", param_hint=param)
        return int(num) if num > 1e11 else int(num * 1000)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time: give ISO 8601 (2026-11-28T10:00:00Z) or unix seconds",
                                 param_hint=param) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def progress_bar(what: str) -> Progress:
    return Progress(SpinnerColumn(), TextColumn(f"[bold]{what}[/bold]"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} records"), TimeElapsedColumn(),
                    console=err, transient=True)


# -- the group --------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--api", envvar="POSTBUS_API_URL", default="http://127.0.0.1:8000", show_default=True,
              help="Base URL of the Postbus API (env POSTBUS_API_URL).")
@click.option("--admin-token", envvar="POSTBUS_ADMIN_TOKEN", default=None, show_default=False,
              help="Admin API token (env POSTBUS_ADMIN_TOKEN; else the local .state/admin.token); never printed.")
@click.option("--bootstrap", envvar="POSTBUS_KAFKA_BOOTSTRAP", default="127.0.0.1:9092", show_default=True,
              help="Kafka bootstrap servers, for the commands that read the topics (env POSTBUS_KAFKA_BOOTSTRAP).")
@click.option("--metrics-url", envvar="POSTBUS_METRICS_URL", default=None,
              help="Metrics service URL, only for the progress of `replay analytics` (env POSTBUS_METRICS_URL).")
@click.option("--internal-token", envvar="POSTBUS_INTERNAL_TOKEN", default=None,
              help="Internal service credential for --metrics-url (env POSTBUS_INTERNAL_TOKEN; else the local "
                   ".state/internal.token, with --metrics-url defaulting to http://127.0.0.1:8010); never printed.")
@click.pass_context
def cli(ctx: click.Context, api: str, admin_token: str | None, bootstrap: str, metrics_url: str | None,
        internal_token: str | None) -> None:
    """Postbus operator command line: audit export, topic tail, message trace, lag, topics,
    dead letters, analytics replay and a tenant's state at any past time."""
    # aiokafka logs connection failures through the root logger's last resort: the CLI says it once
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # a local system (`make up`): its tokens are in the state folder
    admin_token = admin_token or local_token("admin.token")
    if not internal_token and (internal_token := local_token("internal.token")):
        metrics_url = metrics_url or "http://127.0.0.1:8010"
    ctx.obj = Ctx(api, admin_token, bootstrap, metrics_url, internal_token)


# -- export ------------------------------------------------------------------------------------------
@cli.group()
def export() -> None:
    """Export audit data."""


@export.command("command-log")
@click.option("--tenant", "tenant_id", default=None, help="Only this tenant's commands.")
@click.option("--since", default=None, help="From this time (ISO 8601 or unix seconds).")
@click.option("--until", default=None, help="Up to this time (ISO 8601 or unix seconds).")
@click.option("--route", default=None, help='Only commands of this route, e.g. "POST /tenant".')
@click.option("--type", "ctype", default=None, help="Only commands of this type, e.g. tenant.create.")
@click.pass_obj
def export_command_log(ctx: Ctx, tenant_id: str | None, since: str | None, until: str | None,
                       route: str | None, ctype: str | None) -> None:
    """The command log (every accepted state-changing command, secrets redacted) as JSON lines on
    stdout, through the admin API's export; progress on stderr.

    Example: postbus export command-log --tenant acme --since 2026-11-01 > acme.ndjson"""
    params: dict[str, Any] = {}
    if tenant_id:
        params["tenant_id"] = tenant_id
    if since:
        params["since"] = parse_time(since, "--since") / 1000
    if until:
        params["until"] = parse_time(until, "--until") / 1000
    if route:
        params["route"] = route
    if ctype:
        params["type"] = ctype
    lines = 0
    size = 0
    out = sys.stdout.buffer
    with api_call(ctx), ctx.http(timeout=120) as http, http.stream("GET", "/command-log/export", params=params) as r:
        if r.status_code != 200:
            r.read()
            raise api_failure(r)
        with Progress(SpinnerColumn(), TextColumn("[bold]exporting[/bold] {task.completed} commands"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("export", total=None)
            for line in r.iter_lines():
                if not line:
                    continue
                data = (line + "\n").encode()
                out.write(data)
                lines += 1
                size += len(data)
                bar.update(task, completed=lines)
    out.flush()
    err.print(f"exported {lines} commands ({size} bytes)")


# -- tail --------------------------------------------------------------------------------------------
@cli.command()
@click.argument("stream", type=click.Choice(["events", "commands"]))
@click.option("--tenant", "tenant_id", default=None, help="Only this tenant (reads its partition only).")
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


# -- trace -------------------------------------------------------------------------------------------
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


@cli.command()
@click.argument("tenant_id")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of the readable timeline.")
@click.option("--since", default=None,
              help="Read only records from this time on (ISO 8601 or unix seconds): faster on long partitions.")
@click.pass_obj
def trace(ctx: Ctx, tenant_id: str, message_id: str, as_json: bool, since: str | None) -> None:
    """The whole life of one message, from the topics: the messages.add command (offset, time, actor,
    route), every event (attempt, SMTP code, error), the report acknowledgements, and
    bounces/complaints/opens/clicks. Reads the tenant's partitions only.

    Example: postbus trace acme order-4711"""
    since_ms = parse_time(since, "--since") if since else None
    items = run(collect_trace(ctx, tenant_id, message_id, since_ms))
    if not items:
        raise click.ClickException(f"no record of message {message_id!r} of tenant {tenant_id!r} on the topics")
    if as_json:
        emit({"tenant_id": tenant_id, "message_id": message_id,
              "timeline": [{**i, "at": history.iso(i["ts"])} for i in items]})
    else:
        for line in history.render_timeline(tenant_id, message_id, items):
            click.echo(line)


# -- lag / topics --------------------------------------------------------------------------------------
async def _admin(bootstrap: str) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000, client_id="postbus-cli")
    try:
        await asyncio.wait_for(admin.start(), 20)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer ({type(exc).__name__})") from None
    return admin


async def collect_lag(ctx: Ctx, group_filter: str | None) -> list[dict[str, Any]]:
    admin = await _admin(ctx.bootstrap)
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


@cli.command()
@click.option("--group", default=None, help="Only this consumer group.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
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
    if as_json:
        for r in rows:
            emit(r)
        return
    click.echo(f"{'GROUP':<28} {'TOPIC':<44} {'PART':>4} {'COMMITTED':>10} {'END':>10} {'LAG':>8}")
    for r in rows:
        click.echo(f"{r['group']:<28} {r['topic']:<44} {r['partition']:>4} {r['committed']:>10} {r['end']:>10} "
                   f"{r['lag']:>8}")
    total = sum(r["lag"] for r in rows)
    click.echo(f"total lag: {total} records in {len({r['group'] for r in rows})} group(s)")


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

    admin = await _admin(ctx.bootstrap)
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


@cli.command()
@click.option("--topic", default=None, help="Only this topic.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_obj
def topics(ctx: Ctx, topic: str | None, as_json: bool) -> None:
    """Every topic: partitions, cleanup policy and retention, end offsets.

    Example: postbus topics --topic postbus.commands"""
    rows = run(collect_topics(ctx, topic))
    if topic and not rows:
        raise click.ClickException(f"topic {topic!r} does not exist")
    if as_json:
        for r in rows:
            emit(r)
        return
    click.echo(f"{'TOPIC':<46} {'PART':>4} {'RETENTION':>10} {'OFFSETS':>10}  END OFFSETS")
    for r in rows:
        ends = " ".join(f"{p}:{o}" for p, o in r["end_offsets"].items())
        click.echo(f"{r['topic']:<46} {r['partitions']:>4} {_retention(r['retention_ms'], r['cleanup_policy']):>10} "
                   f"{r['records']:>10}  {ends}")


# -- dead letters ----------------------------------------------------------------------------------------
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
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all", enable_idempotence=True,
                                client_id="postbus-cli", request_timeout_ms=15000)
    try:
        await asyncio.wait_for(producer.start(), 20)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise KafkaUnavailable(f"Kafka at {ctx.bootstrap} did not answer ({type(exc).__name__})") from None
    done: list[dict[str, Any]] = []
    try:
        with progress_bar("re-appending") as bar:
            task = bar.add_task("replay", total=len(items))
            for rec, body in items:
                md = await producer.send_and_wait(body["source_topic"], value=body["value"], key=body.get("key"))
                done.append({"dead_letter_offset": rec.offset, "topic": body["source_topic"],
                             "partition": md.partition, "offset": md.offset})
                bar.advance(task)
    finally:
        await producer.stop()
    return done


@cli.command("dead-letters")
@click.option("--topic", "source_topic", default=None, help="Only records dead-lettered from this topic.")
@click.option("--offset", "offsets", type=click.IntRange(min=0), multiple=True,
              help="Only the dead letter at this offset of postbus.deadletter (repeatable).")
@click.option("--since", default=None, help="Only records dead-lettered from this time on.")
@click.option("--replay", is_flag=True, help="Re-append each selected original record to its source topic.")
@click.option("--yes", is_flag=True, help="Confirm --replay without a prompt.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_obj
def dead_letters(ctx: Ctx, source_topic: str | None, offsets: tuple[int, ...], since: str | None, replay: bool,
                 yes: bool, as_json: bool) -> None:
    """List postbus.deadletter records (source topic/partition/offset, consumer, reason), and with
    --replay re-append the original records (same key, same bytes) to their topics, e.g. after a
    consumer was fixed. The original payloads are never printed (only their schema and size).

    Example: postbus dead-letters --topic postbus.commands --replay --yes"""
    since_ms = parse_time(since, "--since") if since else None
    if replay and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("--replay re-appends records to their topics: add --yes to confirm")
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
    if not yes and not click.confirm(f"re-append {len(replayable)} record(s) to their topics?", err=True):
        raise click.ClickException("not confirmed: nothing re-appended")
    for d in run(replay_dead_letters(ctx, replayable)):
        if as_json:
            emit({"replayed": d})
        else:
            click.echo(f"replayed dead letter @{d['dead_letter_offset']} -> {d['topic']}[{d['partition']}]"
                       f"@{d['offset']}")


# -- replay analytics ---------------------------------------------------------------------------------------
@cli.group()
def replay() -> None:
    """Rebuild projections from the topics."""


async def _events_ends(ctx: Ctx) -> dict[str, int]:
    async with consumer(ctx.bootstrap) as c:
        tps = [TopicPartition(EVENTS, p) for p in await partitions_of(c, EVENTS)]
        ends = await c.end_offsets(tps)
    return {str(tp.partition): o for tp, o in ends.items()}


@replay.command("analytics")
@click.option("--yes", is_flag=True, help="Confirm: the analytics tables are dropped and rebuilt.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the rebuild until it has caught up (needs --metrics-url and --internal-token).")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Seconds to wait for the rebuild.")
@click.pass_obj
def replay_analytics(ctx: Ctx, yes: bool, wait: bool, timeout: float) -> None:
    """Drop the analytics (ClickHouse) tables and rebuild them from the event log, through the
    admin API's POST /admin/replay/metrics; then follow the progress (records of postbus.events
    ingested against its end offsets) from the metrics service's ingest status.

    Example: postbus replay analytics --yes"""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("replay drops and rebuilds every analytics table: add --yes to confirm")
        if not click.confirm("drop and rebuild every analytics table?", err=True):
            raise click.ClickException("not confirmed: nothing replayed")
    follow_progress = wait and ctx.metrics_url and ctx.internal_token
    metrics = httpx.Client(base_url=(ctx.metrics_url or "").rstrip("/"), timeout=10,
                           headers={"Authorization": f"Bearer {ctx.internal_token}"}) if follow_progress else None

    def ingest_status() -> dict[str, Any]:
        assert metrics is not None
        try:
            s = metrics.get("/internal/ingest-status")
        except httpx.HTTPError as exc:
            raise click.ClickException(f"the metrics service did not answer ({type(exc).__name__})") from None
        if s.status_code != 200:
            raise click.ClickException(f"the metrics service answered {s.status_code} to ingest-status")
        return s.json()

    rows_before = ingest_status().get("rows") if metrics is not None else None
    with api_call(ctx), ctx.http() as http:
        # answered once the tables are dropped and the ingest rewound (``replaying`` is then true)
        r = http.post("/admin/replay/metrics", json={"confirm": True})
        if r.status_code != 202:
            raise api_failure(r)
    err.print("replay requested")
    if not wait:
        return
    if metrics is None:
        err.print("progress not followed: it needs --metrics-url and --internal-token (the metrics port is internal)")
        return
    ends = run(_events_ends(ctx))
    total = sum(ends.values())
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    with contextlib.closing(metrics), \
            Progress(SpinnerColumn(), TextColumn("[bold]rebuilding analytics[/bold]"), BarColumn(),
                     TextColumn("{task.completed}/{task.total} events, {task.fields[rows]} rows"),
                     TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("replay", total=total, rows=0)
        while True:
            status = ingest_status()
            done = sum(min(int(o), ends.get(p, 0)) for p, o in (status.get("partitions") or {}).items())
            bar.update(task, completed=done, rows=status.get("rows", 0))
            if status.get("caught_up") and not status.get("replaying") and done >= total:
                break
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"the rebuild had not caught up after {timeout:.0f}s ({done}/{total} events)")
            time.sleep(0.5)
    # rows_before: the row count before the replay (equal to rows when no event arrived meanwhile:
    # a rebuild from the same topics gives the same tables)
    click.echo(json.dumps({"ok": True, "events": total, "rows": status.get("rows"), "rows_before": rows_before}))


# -- state-at ---------------------------------------------------------------------------------------------
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


@cli.command("state-at")
@click.argument("tenant_id")
@click.argument("when", metavar="TIME")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of the summary.")
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


def main(argv: list[str] | None = None) -> None:
    """The console script. Click handles usage errors (exit 2) and ClickException (exit 1); an
    unexpected error is one line on stderr and exit 1 (its traceback with POSTBUS_CLI_DEBUG=1); a
    closed stdout (``postbus tail events | head``) ends quietly."""
    try:
        cli.main(args=argv, prog_name="postbus", standalone_mode=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:
        if os.environ.get("POSTBUS_CLI_DEBUG") == "1":
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (POSTBUS_CLI_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)
