"""Kafka -> ClickHouse loader for ``postbus.events`` (delivery events), ``postbus.commands`` (the
message projection: submissions, delete / cleanup / tenant-delete marks) and ``postbus.reports``
(acknowledged reports -> reported_ts). One consumer reads all three, so a replay rewinds them
together.

Offsets live in ClickHouse, next to the rows they describe: on every partition assignment the
consumer seeks to the offset stored there (or to the beginning when there is none), so dropping the
tables rebuilds everything from offset 0. The order per batch is insert rows -> store offsets ->
commit to Kafka; a crash between the first two re-inserts a batch, which the queries absorb
(``store.py``). The Kafka commit only feeds lag monitoring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from services.common.avro import DecodeError, codec
from services.common.deadletter import DeadLetterWriter
from services.common.topics import COMMANDS, EVENTS, REPORTS
from services.metrics import messages as mp
from services.metrics.store import AsyncStore, event_row

log = logging.getLogger("postbus.metrics.ingest")

CONSUMER_NAME = "postbus-metrics"

EVENTS_INGESTED = PromCounter(
    "postbus_metrics_events_ingested_total", "Delivery events loaded into ClickHouse", ["type"]
)
BATCH_SECONDS = Histogram(
    "postbus_metrics_ingest_batch_seconds", "Decode + insert + offset store of one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge("postbus_metrics_consumer_lag", "Records not yet loaded, per partition", ["topic", "partition"])
COMMANDS_INGESTED = PromCounter(
    "postbus_metrics_commands_ingested_total", "Commands applied to the message projection", ["type"]
)
MARK_KINDS = {"messages.delete": "deleted", "messages.cleanup": "cleaned", "tenant.delete": "tenant_deleted"}
TP = tuple[str, int]
DEADLETTERS = PromCounter("postbus_metrics_deadletters_total", "Undecodable events sent to the dead-letter topic")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None  # offsets are stored after every batch: nothing to flush

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.ingestor._seek_assigned(list(assigned))


class Ingestor:
    def __init__(
        self,
        store: AsyncStore,
        bootstrap: str,
        topics: Sequence[str] = (EVENTS, COMMANDS, REPORTS),
        batch_rows: int = 5000,
        batch_ms: int = 200,
        group_id: str = CONSUMER_NAME,
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.batch_rows = batch_rows
        self.batch_ms = batch_ms
        self.group_id = group_id
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.dead_letters: DeadLetterWriter | None = None
        # (topic, partition) -> next offset whose predecessors are all in ClickHouse
        self.positions: dict[TP, int] = {}
        self.rows_ingested = 0
        self.connected = False
        self.replaying = False
        self._replay_started = 0.0
        self._last_progress_log = 0.0
        self._replay_requests: list[asyncio.Future[None]] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # set (and replaced) whenever ``positions`` moves: wakes the read-your-writes waiters
        self._progress = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def _load_positions(self) -> dict[TP, int]:
        out: dict[TP, int] = {}
        for topic in self.topics:
            out.update({(topic, p): o for p, o in (await self.store.load_offsets(topic)).items()})
        return out

    def offsets_of(self, topic: str) -> dict[int, int]:
        return {p: o for (t, p), o in self.positions.items() if t == topic}

    async def start(self) -> None:
        self.positions = await self._load_positions()
        self._task = asyncio.create_task(self._run(), name="metrics-ingest")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_clients()
        log.info("ingest stopped", extra={"positions": self.positions})

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None
        self.connected = False

    async def _connect(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group_id,
                client_id=CONSUMER_NAME,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                max_poll_records=self.batch_rows,
            )
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
            try:
                await producer.start()
                await consumer.start()
            except Exception as exc:
                log.warning("kafka not reachable, retrying", extra={"error": str(exc), "retry_s": backoff})
                for client in (consumer, producer):
                    with contextlib.suppress(Exception):
                        await client.stop()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self.consumer, self.producer = consumer, producer
            self.dead_letters = DeadLetterWriter(producer)
            consumer.subscribe(list(self.topics), listener=_Rebalance(self))
            self.connected = True
            log.info("ingest consuming", extra={"topics": self.topics, "bootstrap": self.bootstrap})
            return

    async def _seek_assigned(self, assigned: list[TopicPartition]) -> None:
        """Seek to the offsets stored in ClickHouse. Retries until ClickHouse answers: falling back
        to Kafka's committed offsets would skip data after the tables were dropped."""
        assert self.consumer is not None
        backoff = 0.5
        while True:
            try:
                stored = await self._load_positions()
                break
            except Exception as exc:
                log.error("cannot read stored offsets, retrying", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        fresh = []
        for tp in assigned:
            key = (tp.topic, tp.partition)
            if key in stored:
                self.consumer.seek(tp, stored[key])
                self.positions[key] = stored[key]
            else:
                fresh.append(tp)
                self.positions[key] = 0
        if fresh:
            await self.consumer.seek_to_beginning(*fresh)
        log.info(
            "partitions assigned",
            extra={"partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
                   "stored": {f"{t}:{p}": o for (t, p), o in stored.items()}},
        )

    # -- replay ----------------------------------------------------------------------------------
    async def request_replay(self, timeout_s: float = 30.0) -> None:
        """Drop + recreate the tables and rewind to offset 0. Runs inside the ingest loop, between
        batches, so no batch read before the reset is inserted (or its offsets stored) after it."""
        if self._task is None or self._task.done():
            await self.store.reset()
            self.positions = {}
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._replay_requests.append(fut)
        self.replaying = True
        await asyncio.wait_for(asyncio.shield(fut), timeout_s)

    async def _do_replay(self) -> None:
        requests, self._replay_requests = self._replay_requests, []
        try:
            log.info("replay started: dropping metrics tables", extra={"topics": self.topics})
            await self.store.reset()
            self.positions = {p: 0 for p in self.positions}
            self.rows_ingested = 0
            self.replaying = True
            self._advanced()  # waiters learn that a replay runs
            self._replay_started = time.monotonic()
            if self.consumer is not None:
                assigned = list(self.consumer.assignment())
                if assigned:
                    await self.consumer.seek_to_beginning(*assigned)
            for fut in requests:
                if not fut.done():
                    fut.set_result(None)
        except Exception as exc:
            for fut in requests:
                if not fut.done():
                    fut.set_exception(exc)
            raise

    # -- loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        await self._connect()
        assert self.consumer is not None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if self._replay_requests:
                    await self._do_replay()
                batch = await self.consumer.getmany(timeout_ms=self.batch_ms, max_records=self.batch_rows)
                await self._process(batch)
                if self.replaying and not batch:
                    await self.caught_up()  # logs "replay finished"
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("ingest batch failed, retrying", extra={"error": str(exc), "retry_s": backoff})
                await self._rewind()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _rewind(self) -> None:
        """After a failed batch, re-read from the last offsets known to be stored."""
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            if (tp.topic, tp.partition) in self.positions:
                with contextlib.suppress(Exception):
                    self.consumer.seek(tp, self.positions[(tp.topic, tp.partition)])

    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None
        t0 = time.perf_counter()
        rows: list[list[Any]] = []
        tables: dict[str, list[list[Any]]] = {"messages": [], "message_marks": [], "reported": []}
        types: Counter[str] = Counter()
        commands: Counter[str] = Counter()
        dead = 0
        dec = codec()
        for tp, records in batch.items():
            for rec in records:
                try:
                    if tp.topic == EVENTS:
                        _, ev = dec.decode(rec.value, expect="DeliveryEvent")
                        row = event_row(ev, tp.partition, rec.offset)
                        rows.append(row)
                        types[row[1]] += 1
                    elif tp.topic == COMMANDS:
                        ctype = self._command_rows(dec, rec, tables)
                        if ctype:
                            commands[ctype] += 1
                    elif tp.topic == REPORTS:
                        _, ack = dec.decode(rec.value, expect="ReportAck")
                        tables["reported"].extend(mp.reported_rows(ack))
                except (DecodeError, KeyError, TypeError, ValueError) as exc:
                    assert self.dead_letters is not None
                    await self.dead_letters.send(rec, CONSUMER_NAME, f"{type(exc).__name__}: {exc}")
                    dead += 1
                    continue

        # positions of every assigned partition: also moves past transaction markers
        moved: dict[int, int] = {}
        for tp in self.consumer.assignment():
            try:
                pos = await self.consumer.position(tp)
            except Exception:
                continue
            if records := batch.get(tp):
                pos = max(pos, records[-1].offset + 1)
            if pos != self.positions.get((tp.topic, tp.partition)):
                moved[(tp.topic, tp.partition)] = pos

        if rows:
            await self.store.insert_events(rows)
        for table, columns in (("messages", mp.MESSAGE_COLUMNS), ("message_marks", mp.MARK_COLUMNS),
                               ("reported", mp.REPORTED_COLUMNS)):
            if tables[table]:
                await self.store.insert_rows(table, tables[table], columns)
        if dead:
            DEADLETTERS.inc(dead)  # each dead letter was acknowledged before its offset moves on
        if moved:
            for topic in {t for t, _ in moved}:
                await self.store.store_offsets(topic, {p: o for (t, p), o in moved.items() if t == topic})
            self.positions.update(moved)
            self._advanced()
            try:
                await self.consumer.commit(
                    {TopicPartition(t, p): OffsetAndMetadata(o, "") for (t, p), o in moved.items()}
                )
            except Exception as exc:  # lag monitoring only; ClickHouse holds the real offsets
                log.warning("kafka offset commit failed", extra={"error": str(exc)})
        for type_, n in types.items():
            EVENTS_INGESTED.labels(type=type_).inc(n)
        for ctype, n in commands.items():
            COMMANDS_INGESTED.labels(type=ctype).inc(n)
        self.rows_ingested += len(rows)
        if batch:
            BATCH_SECONDS.observe(time.perf_counter() - t0)
        self._update_lag()
        self._log_progress(len(rows), dead)

    def _update_lag(self) -> None:
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            end = self.consumer.last_stable_offset(tp)
            if end is None:
                end = self.consumer.highwater(tp)
            if end is not None:
                CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, end - self.positions.get((tp.topic, tp.partition), 0))
                )

    def _log_progress(self, rows: int, dead: int) -> None:
        now = time.monotonic()
        if self.replaying and not self._replay_requests and now - self._last_progress_log >= 2.0:
            self._last_progress_log = now
            log.info(
                "replay progress",
                extra={"rows": self.rows_ingested,
                       "positions": {f"{t}:{p}": o for (t, p), o in sorted(self.positions.items())}},
            )
        elif rows or dead:
            log.debug("batch ingested", extra={"rows": rows, "dead_letters": dead})

    # -- read-your-writes --------------------------------------------------------------------------
    def _advanced(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def reached(self, targets: dict[TP, int]) -> bool:
        """Every (topic, partition) loaded into ClickHouse up to (excluding) its target offset."""
        return all(target <= 0 or self.positions.get(tp, 0) >= target for tp, target in targets.items())

    async def wait_for(self, targets: dict[TP, int], timeout_s: float) -> str:
        """Wait until :meth:`reached`; "reached", or why not: "replaying" (a replay is rebuilding the
        tables: fail fast), "timeout"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.reached(targets):
            if self.replaying or self._replay_requests:
                return "replaying"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "timeout"
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return "reached" if self.reached(targets) else "timeout"
        return "reached"

    # -- status ----------------------------------------------------------------------------------
    async def caught_up(self, timeout_s: float = 3.0) -> bool:
        """Every assigned partition has been loaded up to its (committed-read) end offset."""
        consumer = self.consumer
        if consumer is None or self._replay_requests:
            return False
        assigned = list(consumer.assignment())
        if not assigned:
            return False
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(assigned), timeout_s)
        except Exception:
            return False
        done = all(self.positions.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items())
        if done and self.replaying:
            self.replaying = False
            log.info(
                "replay finished",
                extra={"rows": self.rows_ingested, "seconds": round(time.monotonic() - self._replay_started, 2)},
            )
        return done

    async def status(self) -> dict[str, Any]:
        caught_up = await self.caught_up()
        return {
            "partitions": {str(p): o for p, o in sorted(self.offsets_of(EVENTS).items())},
            "topics": {t: {str(p): o for p, o in sorted(self.offsets_of(t).items())} for t in self.topics},
            "caught_up": caught_up,
            "replaying": self.replaying,
            "connected": self.connected,
        }

    @staticmethod
    def _command_rows(dec: Any, rec: Any, tables: dict[str, list[list[Any]]]) -> str | None:
        """Rows of one command record for the message projection; other command types are skipped."""
        _, env = dec.decode(rec.value, expect="CommandEnvelope")
        ctype = env["type"]
        if ctype == "messages.add":
            _, add = dec.decode(env["payload"], expect="AddMessages")
            tables["messages"].extend(mp.message_rows(add, rec.offset))
            return ctype
        kind = MARK_KINDS.get(ctype)
        if kind is None:
            return None
        # payload schema owned by the command's writer: read it by name, use tenant_id / ids
        _, payload = dec.decode(env["payload"])
        tenant_id = payload.get("tenant_id") or env.get("tenant_id")
        if not tenant_id:
            raise ValueError(f"{ctype} without tenant_id")
        ids = [""] if kind == "tenant_deleted" else [str(i) for i in payload.get("ids") or []]
        tables["message_marks"].extend(mp.mark_rows(tenant_id, ids, kind, rec.offset, int(env["ts"])))
        return ctype
