"""In-memory send order for each account lane: priority 0 first, FIFO within a priority (by
acceptance sequence), messages with a future due time held until then. It is a cache of the
``messages`` table and is rebuilt from it after every recovery or rebalance."""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field


@dataclass
class Lane:
    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (priority, seq, key)
    delayed: list[tuple[int, int, int, str]] = field(default_factory=list)  # (due_ms, priority, seq, key)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # set when the account/tenant is deleted: its workers exit

    def push(self, key: str, priority: int, seq: int, due_ms: int | None, now_ms: int) -> None:
        if due_ms is not None and due_ms > now_ms:
            heapq.heappush(self.delayed, (due_ms, priority, seq, key))
        else:
            heapq.heappush(self.ready, (priority, seq, key))
        self.wake.set()

    def pop(self, now_ms: int) -> str | None:
        while self.delayed and self.delayed[0][0] <= now_ms:
            _, priority, seq, key = heapq.heappop(self.delayed)
            heapq.heappush(self.ready, (priority, seq, key))
        if self.ready:
            return heapq.heappop(self.ready)[2]
        return None

    def next_due_ms(self) -> int | None:
        return self.delayed[0][0] if self.delayed else None

    def __len__(self) -> int:
        return len(self.ready) + len(self.delayed)


class Scheduler:
    def __init__(self) -> None:
        self.lanes: dict[str, Lane] = {}

    def lane(self, account: str) -> Lane:
        lane = self.lanes.get(account)
        if lane is None:
            lane = self.lanes[account] = Lane()
        return lane

    def push(self, account: str, key: str, priority: int, seq: int, due_ms: int | None, now_ms: int) -> bool:
        """Returns True when the lane is new (the caller starts its workers)."""
        new = account not in self.lanes
        self.lane(account).push(key, priority, seq, due_ms, now_ms)
        return new

    def drop(self, account: str) -> Lane | None:
        """Forget an account's lane and tell its workers to stop."""
        lane = self.lanes.pop(account, None)
        if lane is not None:
            lane.closed = True
            lane.ready.clear()
            lane.delayed.clear()
            lane.wake.set()
        return lane

    def clear(self) -> None:
        for lane in self.lanes.values():
            lane.ready.clear()
            lane.delayed.clear()

    def pending(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())


class Ownership:
    """The commands/events partitions this sender instance owns right now, and its sends in flight.

    With several sender instances, Faust moves partitions between them on a rebalance, but an
    in-memory table keeps the rows of partitions it lost. A worker sends a key only while its
    partition is owned (``claim``), and a revocation waits for the sends in flight on the revoked
    partitions to finish (their outcome written), so the new owner recovers the final state and
    never sends the same message again."""

    def __init__(self) -> None:
        self.owned: set[int] | None = None  # None: no assignment seen yet (a single instance owns all)
        self.inflight: dict[str, int] = {}  # key -> partition
        self._changed = asyncio.Event()

    def owns(self, partition: int) -> bool:
        return self.owned is None or partition in self.owned

    def claim(self, key: str, partition: int) -> bool:
        if not self.owns(partition):
            return False
        self.inflight[key] = partition
        return True

    def release(self, key: str) -> None:
        if self.inflight.pop(key, None) is not None:
            self._changed.set()

    def recovered(self, partitions: set[int]) -> None:
        """The assignment once its tables are recovered: only then is the table's state current."""
        self.owned = set(partitions)

    async def revoke(self, partitions: set[int], timeout_s: float) -> int:
        """Stop claiming ``partitions`` and wait (up to ``timeout_s``) for their sends in flight.
        Returns how many were still in flight at the deadline."""
        self.owned = (self.owned or set()) - partitions
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            busy = sum(1 for p in self.inflight.values() if p in partitions)
            left = deadline - loop.time()
            if busy == 0 or left <= 0:
                return busy
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
