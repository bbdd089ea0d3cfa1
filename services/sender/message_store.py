"""The sender's ``messages`` table behind the engine's :class:`services.sender.engine.Store`: on disk
in RocksDB (Faust's ``rocksdb://`` store, one database per changelog partition under the sender's
state folder), with a small in-memory overlay for the values that are not yet durable.

Why on disk: every pending message carries its whole submission (addresses, subject, bodies), and
Faust's in-memory table held each as a Python dict, 4.2-4.5 KB of RAM per queued message
(bench/queued.py): a million deferred messages would not fit in 1 GB. In RocksDB a queued message
costs its encoded bytes on disk; RAM holds the schedule (key, priority, due time) and the overlay.
And a restart no longer replays the whole changelog: Faust recovers each partition from the offset
persisted in its database (``set_persisted_offset``), i.e. only what was written since.

The rule that keeps the database consistent with the changelog: **a value reaches the database
only after its changelog record is on the broker**, so the database is never ahead of the
changelog.
- ``set_local`` (a message accepted, an outcome handed to the group commit): the overlay only.
- ``append`` hands the changelog records to the producer; when the broker has acknowledged them,
  each value goes to its partition's database and leaves the overlay (unless a newer value replaced
  it meanwhile). Nothing is written for a partition that was revoked meanwhile: its next owner
  recovers it from the changelog.
- ``set`` / ``delete`` (in-stream, from a command handler): Faust's own path (database and
  changelog record through Faust's send-soon buffer; the command's offset is committed only after
  that buffer is flushed, so a crash replays the command).
- The persisted offset of a partition is ours alone (Faust's per-record callback is turned off for
  this table): it moves to the highest acknowledged offset only when none of our hand-overs to that
  partition is still outstanding, so every record at or below it is in the database. Faust's
  in-stream records are written to the database before they are sent, so they are covered too.

A crash loses at most the overlay: values whose records were not yet acknowledged (the command
is read again, or the outcome is among the group commit's bounded window of outcomes not yet
durable, docs/architecture.md "Delivery guarantees")."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from aiokafka.structs import TopicPartition

log = logging.getLogger("postbus.sender.store")

SETTLE_TIMEOUT_S = 30.0  # the longest wait for a key's buffered record (see settled)
# decoded values of the entries written last: a message accepted a moment ago is read again by its
# scheduling and its send (profiled: decoding and locating them was 9.6 % of the sender's CPU)
HOT_ENTRIES = 20_000

# RocksDB per partition database: Faust's defaults (64 MB write buffers x 3, a 2 GB block cache)
# are sized for a machine of their own; 8 partitions would reserve gigabytes
ROCKSDB_OPTIONS = {
    "write_buffer_size": 8 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 * 1024 * 1024,
    "target_file_size_base": 32 * 1024 * 1024,
    "max_open_files": 256,
}

# (partition, key, value) records -> the future of their acknowledgements: RecordMetadata of the last
# record of each producer batch (services/common/faust_support.py hand_over_many)
HandOver = Callable[[list[tuple[int, bytes, bytes]]], Awaitable[asyncio.Future[Any]]]


class MessageStore:
    def __init__(self, table: Any, hand_over: HandOver) -> None:
        self.table = table
        self.hand_over = hand_over
        self.overlay: dict[str, dict[str, Any]] = {}  # key -> value not yet in the database
        self.hot: OrderedDict[str, dict[str, Any]] = OrderedDict()  # key -> value as in the database
        self.buffered: dict[str, Any] = {}  # key -> its newest changelog record in Faust's send-soon buffer
        self.outstanding: dict[int, int] = {}  # partition -> our hand-overs not yet applied
        self.acked: dict[int, int] = {}  # partition -> highest offset of ours applied to the database
        # the persisted offset is ours (see the module docstring): Faust's callback would move it past
        # records of ours that are acknowledged but not yet in the database
        table._on_changelog_sent = lambda fut: None

    @property
    def db(self) -> Any:
        """Faust's RocksDB store (``table.data``)."""
        return self.table.data

    # --- reads ---------------------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.overlay.get(key)
        if value is not None:
            return value
        value = self.hot.get(key)
        if value is not None:
            return value
        # by key in every open partition database (bloom filters first), not by Faust's current
        # event: a worker task inherits the event of whatever command created it
        found = self.db._get_bucket_for_key(self.db._encode_key(key))
        return None if found is None else json.loads(found.value)

    def _on_disk(self) -> Iterator[tuple[bytes, bytes]]:
        """Raw entries of every open partition database (the assigned partitions: Faust drops a
        revoked one's), without Faust's persisted-offset entry."""
        for db in list(self.db._dbs.values()):
            for raw_key, raw in db.items():
                if raw_key != self.db.offset_key:
                    yield raw_key, raw

    def keys(self) -> Iterator[str]:
        overlay = list(self.overlay)
        yield from overlay
        for raw_key, _ in self._on_disk():
            key = json.loads(raw_key)
            if key not in self.overlay:
                yield key

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every entry, one at a time (a million queued messages are never all decoded at once)."""
        yield from list(self.overlay.items())
        for raw_key, raw in self._on_disk():
            key = json.loads(raw_key)
            if key not in self.overlay:
                yield key, json.loads(raw)

    # --- writes --------------------------------------------------------------------------------------

    def set_local(self, key: str, value: dict[str, Any]) -> None:
        self.overlay[key] = value

    def set(self, key: str, value: dict[str, Any]) -> None:
        """In-stream write (a command handler; the partition is the command's): the database, then
        the changelog record through Faust's send-soon buffer, as ``table[key] = value`` does."""
        partition = self.table.partition_for_key(key)
        self.overlay.pop(key, None)
        self.hot.pop(key, None)
        k = self.db._encode_key(key)
        self.db._db_for_partition(partition).put(k, self.db._encode_value(value))
        self.db._key_index[k] = partition
        self._buffered(key, self.table.send_changelog(partition, key, value))

    def delete(self, key: str) -> None:
        partition = self.table.partition_for_key(key)
        self.overlay.pop(key, None)
        self.hot.pop(key, None)
        self.db._db_for_partition(partition).delete(self.db._encode_key(key))
        self._buffered(key, self.table.send_changelog(partition, key, value=None, value_serializer="raw"))

    def _buffered(self, key: str, fut: Any) -> None:
        self.buffered[key] = fut
        if len(self.buffered) > 50_000:  # keys never written directly afterwards (deleted, marked)
            self.buffered = {k: f for k, f in self.buffered.items() if not f.done()}

    async def settled(self, keys: Iterable[str]) -> None:
        """Until the buffered changelog records of ``keys`` are on the broker (the buffer is FIFO:
        everything put before them is too), at most ``SETTLE_TIMEOUT_S``. One key's records must
        reach the changelog in the order they were written (recovery keeps the last one), and
        Faust's send-soon buffer can lag seconds behind under load, while ``append`` goes straight
        to the producer (bench/chaos.py found ``pending`` records landing after the ``sent`` state
        written after them). Faust never resolves the future of a buffered record whose send
        failed (broker outage), and that record is lost anyway, so the write goes on after the
        wait rather than stall the group commit."""
        waits = [f for key in keys if (f := self.buffered.pop(key, None)) is not None and not f.done()]
        if waits:
            _, late = await asyncio.wait(waits, timeout=SETTLE_TIMEOUT_S)
            if late:
                log.warning("buffered changelog records not acknowledged in time; writing the outcomes",
                            extra={"records": len(late), "waited_s": SETTLE_TIMEOUT_S})

    async def append(self, records: list[tuple[int, str, dict[str, Any]]]) -> asyncio.Future[Any]:
        """Changelog records of values already in the overlay (``set_local``), with their explicit
        partition (an in-stream write's), handed to the producer after the keys' buffered records;
        returns the future of their acknowledgements, done once the values are in the database."""
        await self.settled(key for _, key, _ in records)
        topic = self.table.changelog_topic
        out = []
        for partition, key, value in records:
            k, _ = topic.prepare_key(key, self.table.key_serializer)
            v, _ = topic.prepare_value(value, self.table.value_serializer)
            out.append((partition, k, v))
        partitions = {p for p, _, _ in records}
        for p in partitions:
            self.outstanding[p] = self.outstanding.get(p, 0) + 1
        try:
            acks = await self.hand_over(out)
        except BaseException:
            self._settle(partitions, [])
            raise
        applied: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_acks(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                self._settle(partitions, [])
                applied.cancel()
                return
            exc = fut.exception()
            if exc is None:
                self._apply(records, out)
            self._settle(partitions, [] if exc is not None else fut.result())
            if exc is not None:
                applied.set_exception(exc)
            else:
                applied.set_result(None)

        acks.add_done_callback(on_acks)
        return applied

    def _apply(self, records: list[tuple[int, str, dict[str, Any]]], encoded: list[tuple[int, bytes, bytes]]) -> None:
        """Acknowledged records into their partitions' databases (open ones only: a revoked
        partition's next owner recovers it from the changelog), then out of the overlay unless
        replaced meanwhile."""
        dbs, index, hot = self.db._dbs, self.db._key_index, self.hot
        for (partition, key, value), (_, k, v) in zip(records, encoded, strict=True):
            db = dbs.get(partition)
            if db is not None:
                db.put(k, v)
                index[k] = partition  # Faust's key -> partition index: a read goes to this database only
                hot[key] = value
                hot.move_to_end(key)
            if self.overlay.get(key) is value:
                del self.overlay[key]
        while len(hot) > HOT_ENTRIES:
            hot.popitem(last=False)

    def _settle(self, partitions: set[int], metadata: list[Any]) -> None:
        for md in metadata or ():
            if md is not None and md.offset > self.acked.get(md.partition, -1):
                self.acked[md.partition] = md.offset
        dbs = self.db._dbs
        for p in partitions:
            left = self.outstanding[p] = self.outstanding[p] - 1
            if left == 0 and p in self.acked and p in dbs:
                # nothing of ours outstanding: every record up to here is in the database
                self.db.set_persisted_offset(TopicPartition(self.table.changelog_topic.get_topic_name(), p),
                                             self.acked[p])

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: their overlay values go (the next owner, maybe this process again,
        recovers them from the changelog)."""
        for key in [k for k, v in self.overlay.items() if v.get("p") in partitions]:
            del self.overlay[key]
        for key in [k for k, v in self.hot.items() if v.get("p") in partitions]:
            del self.hot[key]
        for p in partitions:
            self.acked.pop(p, None)
