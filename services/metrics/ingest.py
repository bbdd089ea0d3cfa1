"""Kafka -> ClickHouse loader for ``postbus.events`` (delivery events), ``postbus.commands`` (the
message projection: submissions, delete / cleanup / tenant-delete marks) and ``postbus.reports``
(acknowledged reports -> reported_ts). One consumer reads all three, so a replay rewinds them
together.

Offsets live in ClickHouse, next to the rows they describe: on every partition assignment the
consumer seeks to the offset stored there (or to the beginning when there is none), so dropping the
tables rebuilds everything from offset 0. The order per batch is insert rows -> store offsets ->
commit to Kafka; a crash between the first two re-inserts a batch, which the queries absorb
(``store.py``). The Kafka commit only feeds lag monitoring.

Batches are time-bounded, not per poll: decoded rows of many polls accumulate until ``flush_rows``
rows or ``flush_ms`` after the first of them (each small chdb insert costs far more than its rows:
issue 11), then one insert per table and one offsets insert, in one worker-thread call. A reader
waiting for offsets (``wait_for``, the read-your-writes route) never waits for the interval: when
the records it needs have been read, it wakes the loop and the current batch is flushed at once.
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

from services.common import lag
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
        # rows read but not flushed are dropped: the next assignment seeks every partition back to
        # its stored offset, so they are read again (by whichever consumer gets them)
        self.ingestor._discard_pending()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.ingestor._seek_assigned(list(assigned))


class _Batch:
    """Rows decoded from the records read since the last flush."""

    def __init__(self) -> None:
        self.events: list[list[Any]] = []
        self.tables: dict[str, list[list[Any]]] = {"messages": [], "message_marks": [], "reported": []}
        self.types: Counter[str] = Counter()
        self.commands: Counter[str] = Counter()
        self.dead = 0
        self.records = 0
        self.started = 0.0  # monotonic time of the first record

    def rows(self) -> int:
        return len(self.events) + sum(len(t) for t in self.tables.values())


class Ingestor:
    def __init__(
        self,
        store: AsyncStore,
        bootstrap: str,
        topics: Sequence[str] = (EVENTS, COMMANDS, REPORTS),
        batch_rows: int = 5000,
        batch_ms: int = 200,
        group_id: str = CONSUMER_NAME,
        flush_rows: int = 20000,
        flush_ms: int = 1000,
    ) -> None:
        self.store = store
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.batch_rows = batch_rows  # records per poll
        self.batch_ms = batch_ms  # longest poll
        self.flush_rows = max(1, flush_rows)  # a batch is written at this many rows ...
        self.flush_ms = max(0, flush_ms)  # ... or this long after its first record, whichever first
        self.group_id = group_id
        self._batch = _Batch()
        self._last_flush = time.monotonic()
        # targets of the read-your-writes waiters; a new waiter sets _wake (ends the current poll)
        self._waiters: list[dict[TP, int]] = []
        self._wake = asyncio.Event()
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
            # postbus_consumer_lag (services/common/lag.py): records not yet stored with their offsets
            lag.register(self.group_id, lag.aiokafka_source(
                lambda: self.consumer, lambda tp: self.positions.get((tp.topic, tp.partition))))
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
        self._wake.set()
        await asyncio.wait_for(asyncio.shield(fut), timeout_s)

    async def _do_replay(self) -> None:
        requests, self._replay_requests = self._replay_requests, []
        self._discard_pending()  # read before the reset: read again from offset 0
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
                records = await self._poll()
                await self._take(records)
                if await self._flush_due():
                    await self._flush()
                if self.replaying and not records and not self._batch.records:
                    await self.caught_up()  # logs "replay finished"
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("ingest batch failed, retrying", extra={"error": str(exc), "retry_s": backoff})
                await self._rewind()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _poll(self) -> dict[TopicPartition, list[Any]]:
        """One ``getmany``, at most until the current batch is due; a new waiter or a replay request
        (``_wake``) ends it early. Cancelling ``getmany`` loses nothing: it drains the fetched
        records synchronously, so it is cancelled either before taking any or after returning."""
        assert self.consumer is not None
        timeout_ms = self.batch_ms
        if self._batch.records:
            left_ms = (self._batch.started + self.flush_ms / 1000.0 - time.monotonic()) * 1000.0
            timeout_ms = int(max(0.0, min(timeout_ms, left_ms)))
        if self._wake.is_set() or timeout_ms <= 0:
            records = await self.consumer.getmany(timeout_ms=0, max_records=self.batch_rows)
        else:
            poll = asyncio.ensure_future(self.consumer.getmany(timeout_ms=timeout_ms, max_records=self.batch_rows))
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({poll, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                if not poll.done():
                    poll.cancel()
                    await asyncio.wait({poll})  # never raises the poll's own cancellation
            records = {} if poll.cancelled() else poll.result()
        self._wake.clear()  # the waiters registered so far are looked at by _flush_due, next
        return records

    async def _take(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Decode the records of one poll into the current batch (dead letters go out at once)."""
        b = self._batch
        dec = codec()
        for tp, records in batch.items():
            if records and not b.records:
                b.started = time.monotonic()
            for rec in records:
                b.records += 1
                try:
                    if tp.topic == EVENTS:
                        _, ev = dec.decode(rec.value, expect="DeliveryEvent")
                        row = event_row(ev, tp.partition, rec.offset)
                        b.events.append(row)
                        b.types[row[1]] += 1
                    elif tp.topic == COMMANDS:
                        ctype = self._command_rows(dec, rec, b.tables)
                        if ctype:
                            b.commands[ctype] += 1
                    elif tp.topic == REPORTS:
                        _, ack = dec.decode(rec.value, expect="ReportAck")
                        b.tables["reported"].extend(mp.reported_rows(ack))
                except (DecodeError, KeyError, TypeError, ValueError) as exc:
                    assert self.dead_letters is not None
                    await self.dead_letters.send(rec, CONSUMER_NAME, f"{type(exc).__name__}: {exc}")
                    b.dead += 1
                    continue

    async def _read_positions(self) -> dict[TP, int]:
        """Next offset to read of every assigned partition (past transaction markers too): what the
        current batch covers once written."""
        assert self.consumer is not None
        out: dict[TP, int] = {}
        for tp in self.consumer.assignment():
            try:
                out[(tp.topic, tp.partition)] = await self.consumer.position(tp)
            except Exception:
                continue
        return out

    async def _flush_due(self) -> bool:
        b = self._batch
        now = time.monotonic()
        if b.records and (b.rows() >= self.flush_rows or now - b.started >= self.flush_ms / 1000.0):
            return True
        if self._waiters:  # flush now if the records a waiter needs have been read
            read = await self._read_positions()
            for targets in self._waiters:
                if not self.reached(targets) and all(
                        target <= 0 or max(self.positions.get(tp, 0), read.get(tp, 0)) >= target
                        for tp, target in targets.items()):
                    return True
            return False
        # nothing decoded, but positions may have moved past transaction markers: store them
        # now and then (the wait route's targets can point past a marker)
        return not b.records and now - self._last_flush >= max(self.flush_ms, self.batch_ms) / 1000.0

    def _discard_pending(self) -> None:
        self._batch = _Batch()

    async def _rewind(self) -> None:
        """After a failed batch, re-read from the last offsets known to be stored."""
        self._discard_pending()
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            if (tp.topic, tp.partition) in self.positions:
                with contextlib.suppress(Exception):
                    self.consumer.seek(tp, self.positions[(tp.topic, tp.partition)])

    async def _flush(self) -> None:
        """Write the current batch: its rows, then the offsets it reaches (one store call), then
        the Kafka commit (lag monitoring only)."""
        assert self.consumer is not None
        t0 = time.perf_counter()
        read = await self._read_positions()
        b, self._batch = self._batch, _Batch()
        self._last_flush = time.monotonic()
        moved = {tp: pos for tp, pos in read.items() if pos != self.positions.get(tp)}
        tables = [(name, rows, columns) for name, rows, columns in (
            ("messages", b.tables["messages"], mp.MESSAGE_COLUMNS),
            ("message_marks", b.tables["message_marks"], mp.MARK_COLUMNS),
            ("reported", b.tables["reported"], mp.REPORTED_COLUMNS)) if rows]
        if b.events or tables or moved:
            await self.store.write_batch(b.events, tables, moved)
        if b.dead:
            DEADLETTERS.inc(b.dead)  # each dead letter was acknowledged before its offset moves on
        if moved:
            self.positions.update(moved)
            self._advanced()
            try:
                await self.consumer.commit(
                    {TopicPartition(t, p): OffsetAndMetadata(o, "") for (t, p), o in moved.items()}
                )
            except Exception as exc:  # lag monitoring only; ClickHouse holds the real offsets
                log.warning("kafka offset commit failed", extra={"error": str(exc)})
        for type_, n in b.types.items():
            EVENTS_INGESTED.labels(type=type_).inc(n)
        for ctype, n in b.commands.items():
            COMMANDS_INGESTED.labels(type=ctype).inc(n)
        self.rows_ingested += len(b.events)
        if b.records:
            BATCH_SECONDS.observe(time.perf_counter() - t0)
        self._update_lag()
        self._log_progress(len(b.events), b.dead)

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

    async def settle(self, timeout_s: float = 3.0) -> str:
        """Every record read from the topics so far is in ClickHouse (the current batch written at
        once): for lookups that must not miss what this service has already consumed."""
        if self.consumer is None:
            return "reached"
        return await self.wait_for(await self._read_positions(), timeout_s)

    async def wait_for(self, targets: dict[TP, int], timeout_s: float) -> str:
        """Wait until :meth:`reached`; "reached", or why not: "replaying" (a replay is rebuilding the
        tables: fail fast), "timeout". While it waits, the ingest loop flushes its batch as soon as
        the records these targets need have been read (not when the batch interval ends)."""
        if self.reached(targets):
            return "reached"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._waiters.append(targets)
        self._wake.set()
        try:
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
        finally:
            self._waiters.remove(targets)

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
