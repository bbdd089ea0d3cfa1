"""Group commit of send outcomes: a worker hands its outcome (the event and the table's new value)
to the :class:`GroupCommit` and goes on to its next message; one task writes the events of every
outcome queued meanwhile at once and awaits them together, then their table records, and only then
calls each outcome's ``done`` (which frees the worker's slot and the key's ownership).

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
    def __init__(self, write_events: WriteEvents, write_table: WriteTable, *, retry_s: float = 1.0) -> None:
        self.write_events = write_events
        self.write_table = write_table
        self.retry_s = retry_s
        self.queue: list[Outcome] = []
        self.unsettled = 0  # handed over, not yet durable
        self.keys: dict[str, int] = {}  # table keys with an outcome not yet durable (how many)
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # set after each written batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

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
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            batch, self.queue = self.queue, []
            t0 = time.perf_counter()
            while True:
                try:
                    await self.write_events([(o.tenant_id, o.event) for o in batch])
                    t1 = time.perf_counter()
                    await self.write_table([(o.partition, o.key, o.value) for o in batch])
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:  # broker trouble: the same records again (an event may repeat, never go missing)
                    log.exception("outcome batch not written: retrying", extra={"outcomes": len(batch)})
                    await asyncio.sleep(self.retry_s)
            t2 = time.perf_counter()
            m.STAGE_SECONDS.labels("event_ack").observe(t1 - t0)
            m.STAGE_SECONDS.labels("state_ack").observe(t2 - t1)
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
