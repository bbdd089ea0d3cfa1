"""The API's only way to change state: append a command to ``postbus.commands``.

Config commands (tenant, account, API key) are written in one Kafka transaction together with
the resulting record on their compacted config topic, so the audit log and the config projection
can never disagree. Message commands use the idempotent (non-transactional) producer: they are
the hot path and need no second record.

Read-your-writes of the message projection (see ``projection.py``): every append remembers, per
tenant, the offset of the tenant's last command on its partition, and :meth:`CommandWriter.read_positions`
tells the offsets a read of that tenant must wait for: the broker's latest committed end offsets of
the tenant's partitions at read time (exact across API replicas) and never less than this
process's own last writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from services.common.avro import codec
from services.common.topics import COMMANDS

log = logging.getLogger("postbus.api.commands")

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Actor:
    kind: str  # "admin" | "tenant" | "support"
    tenant_id: str | None = None
    key_id: str | None = None  # the API key id; for "support", the principal's name

    @property
    def label(self) -> str:
        if self.kind == "admin":
            return "admin"
        if self.kind == "support":
            return f"support:{self.key_id}"
        return f"tenant:{self.tenant_id}/key:{self.key_id}"


@dataclass(frozen=True)
class ConfigRecord:
    topic: str
    key: str
    schema: str | None  # None = tombstone
    value: dict[str, Any] | None


def key_partition(key: bytes, partitions: int) -> int:
    """The partition the producers' default partitioner (aiokafka's, also Faust's) gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class BrokerUnavailable(Exception):
    """A command could not be appended in time (broker down or unreachable): the API answers 503
    with Retry-After. A config write was one transaction: aborted, nothing of it is visible. A plain
    command may still land later (the idempotent producer retries); resubmitting is safe (message ids
    and config upserts are idempotent)."""


class CommandWriter:
    def __init__(self, bootstrap: str, transactional_id: str, write_timeout_s: float = 10.0) -> None:
        common = {"bootstrap_servers": bootstrap, "acks": "all", "request_timeout_ms": 15000}
        self._common = common
        self.bootstrap = bootstrap
        self.transactional_id = transactional_id
        self.write_timeout_s = write_timeout_s
        self.producer = AIOKafkaProducer(enable_idempotence=True, linger_ms=2,
                                         max_request_size=8 * 1024 * 1024, **common)
        self.tx_producer = AIOKafkaProducer(transactional_id=transactional_id, **common)
        self._tx_broken = False  # a transaction failed: the next write starts a fresh transactional producer
        self._suspect = False  # a write failed: check the broker answers before queuing the next one
        self._tx_lock = asyncio.Lock()  # one open transaction per transactional producer
        # tenant -> {(topic, partition): next offset after the tenant's last write from this process}
        self.last_writes: dict[str, dict[TP, int]] = {}
        # broker end-offset reader for read-your-writes (no group, read_committed), made on first use
        self._offsets_reader: AIOKafkaConsumer | None = None
        self._reader_lock = asyncio.Lock()
        self._partition_counts: dict[str, int] = {}

    async def start(self) -> None:
        await self.producer.start()
        await self.tx_producer.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.tx_producer.stop()
        if self._offsets_reader is not None:
            with contextlib.suppress(Exception):
                await self._offsets_reader.stop()
            self._offsets_reader = None

    def _remember(self, tenant_id: str | None, topic: str, partition: int, offset: int) -> None:
        if not tenant_id:
            return
        mine = self.last_writes.setdefault(tenant_id, {})
        mine[(topic, partition)] = max(mine.get((topic, partition), 0), offset + 1)

    async def _reader(self) -> AIOKafkaConsumer:
        async with self._reader_lock:
            if self._offsets_reader is None:
                reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed",
                                          request_timeout_ms=10000, client_id="postbus-api-offsets")
                try:
                    await reader.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await reader.stop()
                    raise
                self._offsets_reader = reader
            return self._offsets_reader

    async def _partitions(self, topic: str) -> int:
        n = self._partition_counts.get(topic)
        if n is None:
            parts = await self.producer.partitions_for(topic)  # waits for the topic's metadata
            if not parts:
                raise RuntimeError(f"topic {topic} has no partitions in the cluster metadata")
            n = self._partition_counts[topic] = len(parts)
        return n

    async def _end_offsets(self, tenant_id: str, topics: list[str]) -> dict[TopicPartition, int]:
        reader = await self._reader()
        wanted = [TopicPartition(t, key_partition(tenant_id.encode(), await self._partitions(t))) for t in topics]
        return await reader.end_offsets(wanted)  # type: ignore[no-any-return]

    async def read_positions(self, tenant_id: str, topics: Iterable[str], timeout_s: float = 5.0) -> dict[TP, int]:
        """The offsets a read of this tenant's projection must wait for, per (topic, partition) of
        the tenant (records are keyed by tenant id): the latest committed end offset of each, read
        from the broker now, and never less than this process's own last write there. Without the
        broker (error): this process's own writes only."""
        topics = list(topics)
        mine = {tp: o for tp, o in self.last_writes.get(tenant_id, {}).items() if tp[0] in topics}
        try:
            ends = await asyncio.wait_for(self._end_offsets(tenant_id, topics), timeout_s)
        except Exception as exc:
            log.warning("end offsets unavailable; waiting for this process's own writes only",
                        extra={"error": repr(exc)})
            return mine
        out = dict(mine)
        for tp, end in ends.items():
            out[(tp.topic, tp.partition)] = max(out.get((tp.topic, tp.partition), 0), int(end))
        return out

    @staticmethod
    def envelope(ctype: str, tenant_id: str | None, actor: Actor, route: str,
                 payload_schema: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        c = codec()
        command_id = uuid.uuid4().hex
        return command_id, c.encode(
            "CommandEnvelope",
            {
                "command_id": command_id,
                "type": ctype,
                "tenant_id": tenant_id,
                "actor": actor.label,
                "ts": int(time.time() * 1000),
                "payload_schema": payload_schema,
                "payload": c.encode(payload_schema, payload),
                "route": route,
            },
        )

    @contextlib.asynccontextmanager
    async def _bounded(self, what: str) -> Any:
        """A write that must finish within write_timeout_s, else BrokerUnavailable."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                yield
        except (KafkaError, TimeoutError) as exc:
            self._suspect = True
            log.warning("command not appended: broker unavailable", extra={"what": what, "error": repr(exc)})
            raise BrokerUnavailable(f"the command log is unavailable ({type(exc).__name__})") from None
        self._suspect = False

    async def _reachable(self, producer: AIOKafkaProducer) -> None:
        """Fail fast, before anything is queued, when no broker answers a metadata request: a write
        queued while the broker is down would otherwise land later, after its 503. Checked before
        every transaction and, after a failure, before every write until one succeeds."""
        try:
            ok = await asyncio.wait_for(producer.client.force_metadata_update(), min(3.0, self.write_timeout_s))
        except (KafkaError, TimeoutError):
            ok = False
        if not ok:
            self._suspect = True
            raise BrokerUnavailable("no broker answers")

    async def append(self, ctype: str, tenant_id: str | None, actor: Actor, route: str,
                     payload_schema: str, payload: dict[str, Any]) -> str:
        command_id, value = self.envelope(ctype, tenant_id, actor, route, payload_schema, payload)
        key = (tenant_id or "").encode()
        if self._suspect:
            await self._reachable(self.producer)
        async with self._bounded(ctype):
            md = await self.producer.send_and_wait(COMMANDS, value=value, key=key)
        self._remember(tenant_id, COMMANDS, md.partition, md.offset)
        return command_id

    async def append_many(self, items: list[tuple[str, str | None, Actor, str, str, dict[str, Any]]]) -> None:
        """Several commands, sent concurrently (batched by the producer), all acknowledged on return."""
        if self._suspect:
            await self._reachable(self.producer)
        async with self._bounded(items[0][0] if items else "commands"):
            await self._append_many(items)

    async def _append_many(self, items: list[tuple[str, str | None, Actor, str, str, dict[str, Any]]]) -> None:
        futures = []
        for ctype, tenant_id, actor, route, schema, payload in items:
            _, value = self.envelope(ctype, tenant_id, actor, route, schema, payload)
            futures.append(await self.producer.send(COMMANDS, value=value, key=(tenant_id or "").encode()))
        results = await asyncio.gather(*futures)
        for (_, tenant_id, *_rest), md in zip(items, results, strict=True):
            self._remember(tenant_id, COMMANDS, md.partition, md.offset)

    async def append_config(self, ctype: str, tenant_id: str | None, actor: Actor, route: str,
                            payload_schema: str, payload: dict[str, Any],
                            records: list[ConfigRecord]) -> dict[str, dict[int, int]]:
        """Command + config records atomically. Returns {topic: {partition: offset}} of the records."""
        async with self._tx_lock:
            if self._tx_broken:
                await self._renew_tx_producer()
            # a transaction begun while the broker is down could still commit later, after its 503
            await self._reachable(self.tx_producer)
            try:
                async with self._bounded(ctype):
                    return await self._append_config(ctype, tenant_id, actor, route, payload_schema, payload,
                                                     records)
            except BrokerUnavailable:
                self._tx_broken = True  # its transaction state is unknown: use a fresh producer next time
                raise

    async def _renew_tx_producer(self) -> None:
        """A new transactional producer with the same id: its init fences and aborts whatever the
        old one left open, so no half-written transaction ever becomes visible."""
        old, self.tx_producer = self.tx_producer, AIOKafkaProducer(transactional_id=self.transactional_id,
                                                                   **self._common)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), 5)
        try:
            async with self._bounded("transactional producer start"):
                await self.tx_producer.start()
        except BrokerUnavailable:
            self.tx_producer = AIOKafkaProducer(transactional_id=self.transactional_id, **self._common)
            raise
        self._tx_broken = False

    async def _append_config(self, ctype: str, tenant_id: str | None, actor: Actor, route: str,
                             payload_schema: str, payload: dict[str, Any],
                             records: list[ConfigRecord]) -> dict[str, dict[int, int]]:
        _, value = self.envelope(ctype, tenant_id, actor, route, payload_schema, payload)
        c = codec()
        async with self.tx_producer.transaction():
            command = await self.tx_producer.send(COMMANDS, value=value, key=(tenant_id or "").encode())
            futures = []
            for rec in records:
                data = c.encode(rec.schema, rec.value) if rec.schema and rec.value is not None else None
                futures.append((rec.topic, await self.tx_producer.send(rec.topic, value=data, key=rec.key.encode())))
        md = await command
        self._remember(tenant_id, COMMANDS, md.partition, md.offset)
        offsets: dict[str, dict[int, int]] = {}
        for topic, fut in futures:
            md = await fut
            offsets.setdefault(topic, {})[md.partition] = max(offsets.get(topic, {}).get(md.partition, -1),
                                                              md.offset)
        return offsets
