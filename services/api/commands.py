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
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced
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


@dataclass
class ConfigWrite:
    """One read-modify-write's outcome: the command and its config records (see update_config)."""

    ctype: str
    tenant_id: str | None
    actor: Actor
    route: str
    payload_schema: str
    payload: dict[str, Any]
    records: list[ConfigRecord]


# a fenced transactional producer: it says so, or (fenced mid-transaction) refuses to go on
_FENCED = (ProducerFenced, InvalidProducerEpoch, IllegalOperation)
RMW_TX_PREFIX = "postbus-api-rmw"  # shared by every API instance: one transactional id per shard
RMW_ATTEMPTS = 8


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
        # read-modify-write producers, one per shard (tenant partition / "instance"), same ids in
        # every API instance: see update_config
        self._rmw: dict[str, AIOKafkaProducer] = {}
        self._rmw_locks: dict[str, asyncio.Lock] = {}
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
        for producer in self._rmw.values():
            with contextlib.suppress(Exception):
                await producer.stop()
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
        except _FENCED:
            raise  # another API instance took the shard's transactional id: update_config retries
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
            except _FENCED:
                self._tx_broken = True  # another process took this transactional id
                raise BrokerUnavailable("the command log writer was fenced; retry") from None

    async def shard_of(self, tenant_id: str | None) -> str:
        """The serialisation shard of a tenant's config: its commands partition (``instance`` for
        instance-wide records)."""
        if not tenant_id:
            return "instance"
        return f"p{key_partition(tenant_id.encode(), await self._partitions(COMMANDS))}"

    async def update_config(self, shard: str, catch_up: Callable[[], Awaitable[None]],
                            build: Callable[[], ConfigWrite]) -> dict[str, dict[int, int]]:
        """A read-modify-write of config that stays correct with any number of API instances.

        Every instance writes a shard's updates through a transactional producer with the same
        transactional id (``postbus-api-rmw-<shard>``). Starting such a producer fences every older
        one, whose commit then fails with ProducerFenced; so a commit that succeeds proves that no
        other instance started one since ours, hence none committed an update of the shard since:
        the view we caught up to the end of the topics after our start was complete. On
        ProducerFenced we start a new producer (fencing the others in turn), catch up again,
        rebuild the update from the fresh view and retry. Inside one instance a lock serialises."""
        lock = self._rmw_locks.setdefault(shard, asyncio.Lock())
        async with lock:
            for attempt in range(1, RMW_ATTEMPTS + 1):
                # a transaction begun while the broker is down could still commit later, after its 503
                await self._reachable(self.producer)
                producer = await self._rmw_producer(shard)
                try:
                    async with asyncio.timeout(self.write_timeout_s):
                        await catch_up()
                        write = build()
                        return await self._transaction(producer, write)
                except (*_FENCED, KafkaError) as exc:
                    # fenced by another instance (or its transaction state broken by the fence, which
                    # aiokafka reports as a plain KafkaError): nothing committed (or, if the commit answer
                    # was lost, the same idempotent update is applied once more)
                    log.info("config update fenced or refused: retrying",
                             extra={"shard": shard, "attempt": attempt, "error": repr(exc)})
                    await self._drop_rmw_producer(shard)
                    # two instances retrying in step would fence each other again: random backoff
                    await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
                except TimeoutError:
                    await self._drop_rmw_producer(shard)
                    self._suspect = True
                    raise BrokerUnavailable("the command log is unavailable (timeout)") from None
        raise BrokerUnavailable(f"config update of {shard} kept being fenced by other API instances")

    async def _rmw_producer(self, shard: str) -> AIOKafkaProducer:
        producer = self._rmw.get(shard)
        if producer is None:
            producer = AIOKafkaProducer(transactional_id=f"{RMW_TX_PREFIX}-{shard}", **self._common)
            try:
                async with self._bounded(f"rmw producer {shard}"):
                    await producer.start()
            except BrokerUnavailable:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._rmw[shard] = producer
        return producer

    async def _drop_rmw_producer(self, shard: str) -> None:
        producer = self._rmw.pop(shard, None)
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

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
        return await self._transaction(self.tx_producer, ConfigWrite(ctype, tenant_id, actor, route,
                                                                     payload_schema, payload, records))

    async def _transaction(self, producer: AIOKafkaProducer, w: ConfigWrite) -> dict[str, dict[int, int]]:
        _, value = self.envelope(w.ctype, w.tenant_id, w.actor, w.route, w.payload_schema, w.payload)
        c = codec()
        command: asyncio.Future[Any] | None = None
        futures: list[tuple[str, asyncio.Future[Any]]] = []
        try:
            async with producer.transaction():
                command = await producer.send(COMMANDS, value=value, key=(w.tenant_id or "").encode())
                for rec in w.records:
                    data = c.encode(rec.schema, rec.value) if rec.schema and rec.value is not None else None
                    futures.append((rec.topic, await producer.send(rec.topic, value=data, key=rec.key.encode())))
        except BaseException:
            for fut in [command, *(f for _, f in futures)]:
                if fut is not None:  # an aborted transaction's sends fail: their errors are this one
                    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        md = await command
        tenant_id = w.tenant_id
        self._remember(tenant_id, COMMANDS, md.partition, md.offset)
        offsets: dict[str, dict[int, int]] = {}
        for topic, fut in futures:
            md = await fut
            offsets.setdefault(topic, {})[md.partition] = max(offsets.get(topic, {}).get(md.partition, -1),
                                                              md.offset)
        return offsets
