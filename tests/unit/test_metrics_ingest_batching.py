"""The ingest loop's batching (no broker, no ClickHouse): many polls -> one write per batch with its
offsets; a read-your-writes waiter flushes the current batch at once instead of waiting for the
batch interval; a failed write re-reads from the stored offsets."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from services.common.avro import codec
from services.common.topics import EVENTS
from services.metrics.ingest import Ingestor

TP0 = TopicPartition(EVENTS, 0)


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes = b"t-a"


def event(n: int) -> bytes:
    return codec().encode("DeliveryEvent", {
        "event_id": f"e{n}", "type": "sent", "tenant_id": "t-a", "account_id": "acc", "message_id": f"m{n}",
        "pk": None, "ts": 1_700_000_000_000 + n, "accepted_ts": None, "attempt": 1, "smtp_code": 250,
        "error": None, "deferred_reason": None, "deferred_until": None, "batch_code": None,
        "sender_domain": None, "recipients": 1,
    })


class FakeConsumer:
    """getmany hands out what the test queued (at most one poll's worth), else waits its timeout."""

    def __init__(self) -> None:
        self.queue: list[Rec] = []
        self.pos = 0
        self.arrived = asyncio.Event()
        self.commits: list[dict[TopicPartition, Any]] = []
        self.polls = 0

    def add(self, *recs: Rec) -> None:
        self.queue.extend(recs)
        self.arrived.set()

    def assignment(self) -> set[TopicPartition]:
        return {TP0}

    async def position(self, tp: TopicPartition) -> int:
        return self.pos

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos = offset

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        self.polls += 1
        if not any(r.offset >= self.pos for r in self.queue) and timeout_ms:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout_ms / 1000)
            except TimeoutError:
                pass
        recs = [r for r in self.queue if r.offset >= self.pos][: max_records or 1000]
        if not recs:
            return {}
        self.pos = recs[-1].offset + 1
        return {TP0: recs}

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(offsets)

    def last_stable_offset(self, tp: TopicPartition) -> int:
        return self.pos

    def highwater(self, tp: TopicPartition) -> int:
        return self.pos


class FakeStore:
    def __init__(self) -> None:
        self.writes: list[tuple[list[Any], list[Any], dict[tuple[str, int], int]]] = []
        self.fail_next = False
        self.written = asyncio.Event()

    async def write_batch(self, events: list[Any], tables: list[Any], offsets: dict[tuple[str, int], int]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("insert failed")
        self.writes.append((list(events), list(tables), dict(offsets)))
        self.written.set()


def ingestor(flush_ms: int = 1000, flush_rows: int = 20000) -> tuple[Ingestor, FakeConsumer, FakeStore]:
    store = FakeStore()
    ing = Ingestor(store, "unused:9092", batch_rows=10, batch_ms=50,  # type: ignore[arg-type]
                   flush_rows=flush_rows, flush_ms=flush_ms)
    consumer = FakeConsumer()
    ing.consumer = consumer  # type: ignore[assignment]
    ing.positions = {(EVENTS, 0): 0}  # as after the partition assignment
    return ing, consumer, store


async def _start(ing: Ingestor) -> asyncio.Task[None]:
    async def noop() -> None:
        return None

    ing._connect = noop  # type: ignore[method-assign]
    task = asyncio.create_task(ing._run())
    await asyncio.sleep(0)
    return task


async def _stop(ing: Ingestor, task: asyncio.Task[None]) -> None:
    ing._stopping.set()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_many_polls_are_one_write_with_the_offsets() -> None:
    async def run() -> None:
        ing, consumer, store = ingestor(flush_ms=400)
        task = await _start(ing)
        try:
            for n in range(35):  # 10 records per poll: at least 4 polls
                consumer.add(Rec(EVENTS, 0, n, event(n)))
                await asyncio.sleep(0.005)
            await asyncio.wait_for(store.written.wait(), 3)
            await asyncio.sleep(0.1)
            assert consumer.polls >= 4
            assert len(store.writes) == 1, store.writes  # one batch: every row and its offsets together
            events, tables, offsets = store.writes[0]
            assert [r[0] for r in events] == [f"e{n}" for n in range(35)]
            assert tables == [] and offsets == {(EVENTS, 0): 35}
            assert ing.positions == {(EVENTS, 0): 35} and ing.rows_ingested == 35
            assert [c[TP0].offset for c in consumer.commits] == [35]
        finally:
            await _stop(ing, task)

    asyncio.run(run())


def test_row_limit_flushes_before_the_interval() -> None:
    async def run() -> None:
        ing, consumer, store = ingestor(flush_ms=60_000, flush_rows=20)
        task = await _start(ing)
        try:
            consumer.add(*(Rec(EVENTS, 0, n, event(n)) for n in range(25)))
            await asyncio.wait_for(store.written.wait(), 3)
            assert store.writes and len(store.writes[0][0]) == 20  # polls of 10: flushed at 20 rows
        finally:
            await _stop(ing, task)

    asyncio.run(run())


def test_a_waiter_flushes_the_current_batch_at_once() -> None:
    async def run() -> None:
        ing, consumer, store = ingestor(flush_ms=30_000)  # the interval alone would take 30 s
        task = await _start(ing)
        try:
            consumer.add(*(Rec(EVENTS, 0, n, event(n)) for n in range(5)))
            await asyncio.sleep(0.2)
            assert store.writes == [] and ing.positions.get((EVENTS, 0), 0) == 0  # read, batched, not written
            t0 = time.monotonic()
            assert await ing.wait_for({(EVENTS, 0): 5}, 5.0) == "reached"
            assert time.monotonic() - t0 < 1.0
            assert len(store.writes) == 1 and store.writes[0][2] == {(EVENTS, 0): 5}
            # a waiter for records not read yet: flushed as soon as they arrive
            waiter = asyncio.create_task(ing.wait_for({(EVENTS, 0): 8}, 5.0))
            await asyncio.sleep(0.1)
            assert not waiter.done()
            t0 = time.monotonic()
            consumer.add(*(Rec(EVENTS, 0, n, event(n)) for n in range(5, 8)))
            assert await waiter == "reached"
            assert time.monotonic() - t0 < 1.0
            assert ing._waiters == []
        finally:
            await _stop(ing, task)

    asyncio.run(run())


def test_a_failed_write_reads_the_batch_again() -> None:
    async def run() -> None:
        ing, consumer, store = ingestor(flush_ms=100)
        store.fail_next = True
        task = await _start(ing)
        try:
            consumer.add(*(Rec(EVENTS, 0, n, event(n)) for n in range(5)))
            assert await ing.wait_for({(EVENTS, 0): 5}, 5.0) == "reached"  # after the retry (0.5 s backoff)
            assert len(store.writes) == 1
            assert [r[0] for r in store.writes[0][0]] == [f"e{n}" for n in range(5)]  # all of it, once
        finally:
            await _stop(ing, task)

    asyncio.run(run())
