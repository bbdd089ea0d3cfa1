"""Group commit of send outcomes: a worker hands its outcome (the event and the table's new value)
to the :class:`GroupCommit` and goes on to its next message; the commit writes the events of every
outcome queued meanwhile at once and awaits them together, then their table records, and only then
calls each outcome's ``done`` (which frees the worker's slot and the key's ownership). Events and
table records are two pipelined stages: one batch's table records and the next batch's events are
written at the same time.

The order per message is kept: its changelog record is written only after its event is on the
broker, so a crash can lose a table update (the message is sent again), never an event.

The window is bounded per worker: a worker owns ``per_worker`` slots (an :class:`asyncio.Semaphore`)
and waits for a free one before handing over an outcome. So a crash resends at most, per SMTP
worker, its one send in flight plus ``per_worker`` outcomes not yet durable (docs/architecture.md,
"Delivery guarantees")."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.sender import metrics as m

log = logging.getLogger("postbus.sender.commit")

# events as (tenant_id, event); all acknowledged on return
WriteEvents = Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]]
# table records as (partition, key, value); all on the broker on return (the local store is
# written by the caller when it hands the outcome over)
WriteTable = Callable[[list[tuple[int, str, dict[str, Any]]]], Awaitable[None]]


@dataclass
class Outcome:
    tenant_id: str
    event: dict[str, Any]
    partition: int
    key: str
    value: dict[str, Any]
    done: Callable[[], None]


class GroupCommit:
    """Two stages, each one batch at a time, so that a batch's table records and the next batch's
    events are written at the same time: the events stage takes every outcome queued, writes the
    events and waits for their acks, then hands the batch to the table stage (at most one batch
    waits between the two), which writes the changelog records, waits for their acks and calls each
    ``done``. Per message the event is durable before its table record is written; table records
    are written in outcome order (one batch at a time, retried before the next), so the changelog's
    last value per key is the newest outcome."""

    def __init__(self, write_events: WriteEvents, write_table: WriteTable, *, retry_s: float = 1.0) -> None:
        self.write_events = write_events
        self.write_table = write_table
        self.retry_s = retry_s
        self.queue: list[Outcome] = []
        self.unsettled = 0  # handed over, not yet durable
        self.keys: dict[str, int] = {}  # table keys with an outcome not yet durable (how many)
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # set after each written batch
        self._tables: asyncio.Queue[list[Outcome]] = asyncio.Queue(maxsize=1)  # events durable, table not yet
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            self._tasks = [asyncio.ensure_future(self._events_stage()), asyncio.ensure_future(self._table_stage())]

    def submit(self, outcome: Outcome) -> None:
        """Queue an outcome (the caller holds one of its worker's slots; ``done`` frees it)."""
        self.queue.append(outcome)
        self.keys[outcome.key] = self.keys.get(outcome.key, 0) + 1
        self.unsettled += 1
        self._wake.set()
        self.start()

    async def flush(self) -> None:
        """Return once every outcome handed over before this call is durable."""
        while self.unsettled:
            self._settled.clear()
            self.start()
            await self._settled.wait()

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), 10.0)
        except TimeoutError:
            log.error("outcomes not written at shutdown", extra={"unsettled": self.unsettled})
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _retrying(self, what: str, write: Callable[[list[Any]], Awaitable[None]], records: list[Any]) -> None:
        while True:
            try:
                await write(records)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # broker trouble: the same records again (an event may repeat, never go missing)
                log.exception(f"outcome {what} not written: retrying", extra={"outcomes": len(records)})
                await asyncio.sleep(self.retry_s)

    async def _events_stage(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            batch, self.queue = self.queue, []
            t0 = time.perf_counter()
            await self._retrying("events", self.write_events, [(o.tenant_id, o.event) for o in batch])
            m.STAGE_SECONDS.labels("event_ack").observe(time.perf_counter() - t0)
            await self._tables.put(batch)  # waits while the table stage still has one waiting

    async def _table_stage(self) -> None:
        while True:
            batch = await self._tables.get()
            t0 = time.perf_counter()
            await self._retrying("table records", self.write_table, [(o.partition, o.key, o.value) for o in batch])
            m.STAGE_SECONDS.labels("state_ack").observe(time.perf_counter() - t0)
            self.unsettled -= len(batch)
            for o in batch:
                left = self.keys.pop(o.key, 1) - 1
                if left:
                    self.keys[o.key] = left
                try:
                    o.done()
                except Exception:
                    log.exception("outcome callback failed")
            self._settled.set()
