"""Direct reads of the topics for the CLI: snapshot reads (from a start to the end offsets taken when
the read begins), a follow mode for ``tail``, and the decoding of every record into redacted JSON.

Consumers here have no group (nothing is committed, no service's offsets move) and read
``read_committed`` like every Postbus reader: records of aborted transactions are never shown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from services.common.avro import DecodeError, codec
from services.common.redaction import redact
from services.common.topics import TopicMissing, topic_partitions

CONNECT_TIMEOUT_S = 20.0
STALL_POLLS = 50  # empty polls (x 200 ms) before a partition that does not reach its end is given up


class KafkaUnavailable(RuntimeError):
    """The broker did not answer, or a topic is missing: a failure (exit code 1)."""


def partition_for(tenant_id: str, partitions: int) -> int:
    """The partition the producers' default partitioner picks for a tenant key (commands, events and
    reports are keyed by tenant id)."""
    return (murmur2(tenant_id.encode()) & 0x7FFFFFFF) % partitions


async def _start(client: Any, bootstrap: str) -> None:
    """Start a Kafka client within CONNECT_TIMEOUT_S, or stop it and raise KafkaUnavailable."""
    try:
        await asyncio.wait_for(client.start(), CONNECT_TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await (getattr(client, "stop", None) or client.close)()  # the admin client has close() only
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer ({type(exc).__name__})") from None


@contextlib.asynccontextmanager
async def consumer(bootstrap: str, *, committed_only: bool = True) -> AsyncIterator[AIOKafkaConsumer]:
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed" if committed_only else "read_uncommitted",
        fetch_max_wait_ms=100, request_timeout_ms=15000, client_id="postbus-cli",
    )
    await _start(c, bootstrap)
    try:
        yield c
    finally:
        await c.stop()


@contextlib.asynccontextmanager
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """An idempotent producer (``acks=all``) for the commands that append (``dead-letters --replay``)."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                         client_id="postbus-cli", request_timeout_ms=15000)
    await _start(p, bootstrap)
    try:
        yield p
    finally:
        await p.stop()


async def admin_client(bootstrap: str) -> Any:
    """A started Kafka admin client (``lag``, ``topics``); the caller closes it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000, client_id="postbus-cli")
    await _start(admin, bootstrap)
    return admin


async def partitions_of(c: AIOKafkaConsumer, topic: str) -> list[int]:
    try:
        return await topic_partitions(c, topic, attempts=20)
    except TopicMissing as exc:
        raise KafkaUnavailable(str(exc)) from None


async def tenant_partition(c: AIOKafkaConsumer, topic: str, tenant_id: str) -> TopicPartition:
    parts = await partitions_of(c, topic)
    return TopicPartition(topic, partition_for(tenant_id, len(parts)))


async def read_snapshot(c: AIOKafkaConsumer, tps: list[TopicPartition], *,
                        start: dict[TopicPartition, int] | None = None,
                        end: dict[TopicPartition, int] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> AsyncIterator[Any]:
    """Every record of ``tps`` from ``start`` (default: the beginning) up to the end offsets taken now
    (or up to ``end``, when given and not past them), partition by partition in offset order.
    ``progress(done, total)`` is called as records arrive."""
    if not tps:
        return
    c.assign(tps)
    begins = await c.beginning_offsets(tps)
    ends = await c.end_offsets(tps)
    if end is not None:
        ends = {tp: min(o, end.get(tp, o)) for tp, o in ends.items()}
    starts = {tp: max(begins[tp], (start or {}).get(tp, begins[tp])) for tp in tps}
    total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
    done = 0
    if progress:
        progress(done, total)
    pending = [tp for tp in tps if starts[tp] < ends[tp]]
    for tp in pending:
        c.seek(tp, starts[tp])
    empty = 0
    while pending:
        batch = await c.getmany(*pending, timeout_ms=200, max_records=1000)
        got = False
        for tp in pending:
            for rec in batch.get(tp, ()):
                if rec.offset < ends[tp]:
                    got = True
                    yield rec
            # transaction markers take offsets too: the position, not the records, says we are done
        for tp in list(pending):
            pos = await c.position(tp)
            if pos >= ends[tp]:
                pending.remove(tp)
        if progress:
            left = 0
            for tp in pending:
                left += max(0, ends[tp] - await c.position(tp))
            progress(total - left, total)
        empty = 0 if got else empty + 1
        if empty >= STALL_POLLS:
            raise KafkaUnavailable(f"reading {', '.join(f'{tp.topic}[{tp.partition}]' for tp in pending)} "
                                   "stalled before its end offset (a hanging transaction?)")


async def follow(c: AIOKafkaConsumer, tps: list[TopicPartition], *, from_beginning: bool) -> AsyncIterator[Any]:
    """Records of ``tps`` as they arrive (from the beginning, or from the end offsets now), forever."""
    c.assign(tps)
    if from_beginning:
        await c.seek_to_beginning(*tps)
    else:
        await c.seek_to_end(*tps)
    while True:
        batch = await c.getmany(*tps, timeout_ms=500, max_records=500)
        for tp in sorted(batch, key=lambda t: t.partition):
            for rec in batch[tp]:
                yield rec


# -- decoding -------------------------------------------------------------------------------------
def text_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return base64.b64encode(key).decode()


def command_entry(rec: Any, only_types: frozenset[str] | None = None) -> dict[str, Any] | None:
    """The redacted entry of a command record (the command-log export's shape); None when the record
    is not a command envelope (or, with ``only_types``, not one of those types: its payload is then
    not decoded at all). ``_payload`` (not redacted: internal use only) is never printed."""
    c = codec()
    try:
        _, env = c.decode(rec.value, expect="CommandEnvelope")
    except DecodeError:
        return None
    if only_types is not None and env["type"] not in only_types:
        return None
    try:
        _, payload = c.decode(env["payload"], expect=env["payload_schema"])
    except (DecodeError, KeyError):
        payload = None
    return {
        "command_id": env["command_id"], "ts": env["ts"], "type": env["type"], "tenant_id": env.get("tenant_id"),
        "actor": env["actor"], "route": env.get("route"), "payload_schema": env["payload_schema"],
        "payload": redact(payload) if payload is not None else {"_undecodable": True},
        "partition": rec.partition, "offset": rec.offset, "_payload": payload,
    }


def record_json(rec: Any) -> dict[str, Any]:
    """One record of any Postbus topic as redacted JSON: where it is, its key, its schema and body."""
    out: dict[str, Any] = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                           "timestamp": rec.timestamp, "key": text_key(rec.key)}
    if rec.value is None:
        out.update(schema=None, record=None)  # a tombstone
        return out
    entry = command_entry(rec)
    if entry is not None:
        entry.pop("_payload", None)
        out.update(schema="CommandEnvelope", record=entry)
        return out
    try:
        name, body = codec().decode(rec.value)
    except DecodeError as exc:
        out.update(schema=None, record=None, undecodable=str(exc))
        return out
    if name == "DeadLetter":
        body = dead_letter_summary(body)
    out.update(schema=name, record=redact(body))
    return out


def dead_letter_summary(body: dict[str, Any]) -> dict[str, Any]:
    """A dead letter without its raw bytes: the original value may hold anything, so only its schema
    (when it decodes at all) and size are shown."""
    value = body.get("value")
    schema = None
    if value:
        with contextlib.suppress(DecodeError):
            schema = codec().decode(value)[0]
    return {"source_topic": body["source_topic"], "source_partition": body["source_partition"],
            "source_offset": body["source_offset"], "consumer": body["consumer"], "reason": body["reason"],
            "ts": body["ts"], "key": text_key(body.get("key")), "value_schema": schema,
            "value_bytes": len(value) if value is not None else None}
