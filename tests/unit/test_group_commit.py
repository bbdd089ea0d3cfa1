"""The group commit's two stages (services/sender/group_commit.py): one batch's table records are
written while the next batch's events are, a message's event is acknowledged before its table record
is written, and table records keep outcome order, failures included."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from services.sender.group_commit import GroupCommit, Outcome


class Broker:
    """Writers whose acknowledgements the test releases one call at a time."""

    def __init__(self) -> None:
        self.log: list[tuple[str, list[Any]]] = []  # (stage, records) in the order they were written
        self.gates: dict[str, asyncio.Queue[Exception | None]] = {"events": asyncio.Queue(), "table": asyncio.Queue()}
        self.acked: list[tuple[str, list[Any]]] = []

    def writer(self, stage: str) -> Callable[[list[Any]], Awaitable[None]]:
        async def write(records: list[Any]) -> None:
            self.log.append((stage, list(records)))
            failure = await self.gates[stage].get()
            if failure is not None:
                raise failure
            self.acked.append((stage, list(records)))
        return write

    def ack(self, stage: str, failure: Exception | None = None) -> None:
        self.gates[stage].put_nowait(failure)


async def until(predicate: Any, timeout: float = 2.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  (a condition on plain state, polled)
            await asyncio.sleep(0.001)


def outcome(key: str, value: str, done: list[str]) -> Outcome:
    return Outcome("t", {"event": key, "v": value}, 0, key, {"v": value}, lambda: done.append(f"{key}={value}"))


async def test_table_of_one_batch_overlaps_the_events_of_the_next() -> None:
    b = Broker()
    gc = GroupCommit(b.writer("events"), b.writer("table"), retry_s=0.01)
    done: list[str] = []
    gc.submit(outcome("a", "1", done))
    await until(lambda: len(b.log) == 1)
    assert b.log[0][0] == "events"
    gc.submit(outcome("b", "1", done))  # queued while a's events are in flight
    b.ack("events")  # a's events durable -> a's table records go out, and b's events with them
    await until(lambda: len(b.log) == 3)
    assert sorted(stage for stage, _ in b.log[1:]) == ["events", "table"]
    assert done == [] and gc.unsettled == 2
    b.ack("table")
    await until(lambda: done == ["a=1"])
    b.ack("events")
    b.ack("table")
    await gc.flush()
    assert done == ["a=1", "b=1"] and gc.unsettled == 0 and not gc.keys
    await gc.stop()


async def test_event_is_acknowledged_before_its_table_record_is_written_even_after_failures() -> None:
    b = Broker()
    gc = GroupCommit(b.writer("events"), b.writer("table"), retry_s=0.01)
    done: list[str] = []
    gc.submit(outcome("a", "1", done))
    await until(lambda: len(b.log) == 1)
    b.ack("events", RuntimeError("broker down"))  # refused: written again, table still waits
    await until(lambda: len(b.log) == 2)
    assert [stage for stage, _ in b.log] == ["events", "events"]
    b.ack("events")
    await until(lambda: len(b.log) == 3)
    assert b.log[2][0] == "table" and b.acked == [("events", [("t", {"event": "a", "v": "1"})])]
    b.ack("table")
    await gc.flush()
    assert done == ["a=1"]
    await gc.stop()


async def test_table_records_keep_outcome_order_when_a_table_write_fails() -> None:
    """Two outcomes of one key in consecutive batches: the older table record is retried and
    acknowledged before the newer one is written, so the changelog ends with the newer value."""
    b = Broker()
    gc = GroupCommit(b.writer("events"), b.writer("table"), retry_s=0.01)
    done: list[str] = []
    gc.submit(outcome("k", "deferred", done))
    await until(lambda: len(b.log) == 1)
    gc.submit(outcome("k", "sent", done))
    b.ack("events")
    await until(lambda: len(b.log) == 3)  # k=deferred table + k=sent events
    b.ack("events")
    b.ack("table", RuntimeError("not leader"))  # k=deferred's table write fails ...
    await until(lambda: len(b.log) == 4)
    b.ack("table")  # ... and is retried first
    b.ack("table")
    await gc.flush()
    tables = [records for stage, records in b.log if stage == "table"]
    assert tables == [[(0, "k", {"v": "deferred"})], [(0, "k", {"v": "deferred"})], [(0, "k", {"v": "sent"})]]
    assert done == ["k=deferred", "k=sent"] and not gc.keys
    await gc.stop()
