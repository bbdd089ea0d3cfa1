"""No command left behind by Faust: the offset guard of the command-consuming agents.

The defect (issue 12 §1, docs/architecture.md "Faust rebalance loss"). When a worker (re)joins its
group, faust-streaming 0.15.3 ``Recovery.on_recovery_completed`` resumes the stream partitions and
then awaits the seek to the committed offsets while the fetcher keeps running: records fetched in
that window go into the agents' queues and advance ``Consumer._read_offset``; ``flow_control.resume()``
then clears every agent queue, and the drain loop, finishing the delivery it was awaiting, writes
its read offset over the one the seek had just set. The re-fetched records are then dropped as
"already read" (``DROPPED MESSAGE ROFF``). An agent whose queue held them never sees them, the next
record it processes is further on, and the ledger (which remembers the last offset applied per
domain) can never apply them later. On top of that, ``Consumer._drain_messages`` registers every
jump of the fetched offsets as a "gap" that ``_new_offset`` counts as acknowledged, and the gap it
registers includes the offset of the record being delivered: the committed offset can move past a
record that was fetched, dropped and never processed.

The guard, per agent and partition, knows the last offset the agent was given (at first sight: the
group's committed offset). An offset beyond the next one expected means Faust skipped something
(or the range holds only transaction markers): the guard re-reads that range from the broker with
its own ``read_committed`` consumer and hands the data records to the agent, in order, before the
record that revealed the hole; an offset at or below the last one is a redelivery and is skipped.
Only then does it tell Faust's consumer that the range is done (``_add_gap``), so the committed
offset moves on; Faust's own gap logic is switched off for guarded topics (``install``).

The stuck-partition monitor covers the tail: records on the broker beyond what an idle agent was
given, for ``STUCK_AFTER_S``, with nothing else to reveal the hole (and every agent of the partition
idle as long: a busy sibling means Faust is still delivering, measured by bench/chaos.py, where the
monitor re-seeked ~200 times under load before this condition). It re-reads the range; if it
holds data records, it logs, counts and re-seeks Faust's consumer to the committed offset (the
guard skips what the agents already had).

Guarded topics must use raw keys and values (the re-read records are handed over as bytes).
Counted in Prometheus: ``postbus_faust_gap_recovered_total``, ``postbus_faust_stuck_partitions_total``,
``postbus_faust_gap_unrecovered_total`` (labels agent, topic, partition)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("postbus.faust.guard")

GAP_RECOVERED = Counter("postbus_faust_gap_recovered_total",
                        "Records Faust never handed to an agent (lost around a rebalance), re-read from the "
                        "broker and processed by the offset guard", ["agent", "topic", "partition"])
GAP_UNRECOVERED = Counter("postbus_faust_gap_unrecovered_total",
                          "Offset ranges the guard could not re-read from the broker (logged as errors)",
                          ["agent", "topic", "partition"])
STUCK = Counter("postbus_faust_stuck_partitions_total",
                "Partitions found with records on the broker that an idle agent was never given; "
                "re-seeked to the committed offset", ["agent", "topic", "partition"])

REREAD_TIMEOUT_S = 20.0   # one attempt at re-reading a range (read_committed waits for open transactions)
REREAD_ATTEMPTS = 3
STUCK_AFTER_S = 10.0      # an agent idle this long with records beyond what it was given: stuck
CHECK_INTERVAL_S = 2.5

_ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Diagnosis only (POSTBUS_FAUST_GUARD=0 in make_app): the agents get Faust's stream as is."""
    global _ENABLED
    _ENABLED = enabled


@dataclass
class ReplayedMessage:
    topic: str
    partition: int
    offset: int
    tp: Any
    key: bytes | None
    value: bytes | None
    timestamp: float | None
    headers: Any


@dataclass
class ReplayedEvent:
    """What an agent reads of a Faust event (key, value, message), for a record the guard re-read."""
    key: bytes | None
    value: bytes | None
    message: ReplayedMessage
    headers: Any = None


@dataclass
class _Guard:
    app: Any
    name: str
    topics: set[str] = field(default_factory=set)
    seen: dict[Any, int] = field(default_factory=dict)  # tp -> last offset handed to the agent
    idle_since: float | None = None                      # the agent waits for its next event since
    checked: dict[Any, tuple[int, int]] = field(default_factory=dict)  # tp -> (next, highwater) found clean


class _AppGuards:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.guards: dict[str, _Guard] = {}
        self._reader: Any = None
        self._reader_lock = asyncio.Lock()
        self._offsets: Any = None
        self._offsets_lock = asyncio.Lock()
        self._baselines: dict[Any, int] = {}  # tp -> the broker's committed offset, until revoked
        self._monitor: asyncio.Task[None] | None = None
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_before_shutdown.connect(self._on_shutdown)

    async def _on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for consumer in (self._reader, self._offsets):
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 2.0)  # the broker may be down

    async def _on_revoked(self, sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        for tp in revoked:
            self._baselines.pop(tp, None)
        for guard in self.guards.values():  # another worker may process them now: start afresh
            for tp in revoked:
                guard.seen.pop(tp, None)
                guard.checked.pop(tp, None)

    def guard(self, name: str) -> _Guard:
        if name not in self.guards:
            self.guards[name] = _Guard(self.app, name)
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.ensure_future(self._watch())
        return self.guards[name]

    async def baseline(self, tp: Any) -> int:
        """The first offset an agent should get on ``tp``: the group's committed offset. Faust's copy
        is None for 0, for "never committed" and between a revocation and its seek, so without it
        the broker is asked; a partition the group never committed starts at the log start
        (auto_offset_reset=earliest), as Faust's consumer does."""
        committed = self.app.consumer._committed_offset.get(tp)
        if committed is not None:
            return int(committed)
        if tp in self._baselines:
            return self._baselines[tp]
        from aiokafka.structs import TopicPartition

        async with self._offsets_lock:
            if self._offsets is None:
                from aiokafka import AIOKafkaConsumer

                offsets = AIOKafkaConsumer(bootstrap_servers=self.app._postbus_bootstrap,
                                           group_id=self.app.conf.id, enable_auto_commit=False)
                await offsets.start()  # never subscribes: it only reads the group's offsets
                self._offsets = offsets
            atp = TopicPartition(tp.topic, tp.partition)
            found = await self._offsets.committed(atp)
            if found is None:
                found = (await self._offsets.beginning_offsets([atp])).get(atp) or 0
            self._baselines[tp] = int(found)
            return self._baselines[tp]

    async def reread(self, tp: Any, start: int, end: int) -> list[Any]:
        """The data records of ``tp`` in [start, end), read_committed (transaction markers and
        aborted records have none). Raises TimeoutError when the broker does not give them in time."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        async with self._reader_lock:
            if self._reader is None:
                reader = AIOKafkaConsumer(bootstrap_servers=self.app._postbus_bootstrap, group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed",
                                          auto_offset_reset="earliest")
                await reader.start()
                self._reader = reader
            reader = self._reader
            atp = TopicPartition(tp.topic, tp.partition)
            if reader.assignment() != {atp}:
                reader.assign([atp])
            reader.seek(atp, start)
            records: list[Any] = []
            deadline = time.monotonic() + REREAD_TIMEOUT_S
            while await reader.position(atp) < end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{tp.topic}:{tp.partition} [{start}, {end}) not readable")
                batch = await reader.getmany(atp, timeout_ms=200)
                records.extend(r for r in batch.get(atp, ()) if start <= r.offset < end)
            return records

    async def _watch(self) -> None:
        """The stuck-partition monitor (see the module docstring)."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("stuck-partition check failed", exc_info=True)

    async def _check(self) -> None:
        app, consumer = self.app, self.app.consumer
        if getattr(app, "rebalancing", False) or not app.tables.recovery.completed.is_set():
            return
        if not app.flow_control.is_active() or not consumer.flow_active:
            return
        now = time.monotonic()
        for tp in list(consumer.assignment()):
            guards = [g for g in self.guards.values() if tp.topic in g.topics]
            if not guards:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            nexts = {g.name: (g.seen[tp] + 1 if tp in g.seen else await self.baseline(tp)) for g in guards}
            # every agent of the partition idle that long: while one of them works, Faust may be
            # handing it the records the others wait for (a full agent queue holds back the delivery
            # of each record to all of them), which is backpressure, not a stuck partition
            if any(g.idle_since is None or now - g.idle_since < STUCK_AFTER_S for g in guards):
                continue
            for guard in guards:
                first = nexts[guard.name]
                if first >= highwater or guard.checked.get(tp) == (first, highwater):
                    continue
                records = await self.reread(tp, first, highwater)
                if not records:  # only transaction markers (or aborted records) beyond: nothing missed
                    guard.checked[tp] = (first, highwater)
                    continue
                if tp in guard.seen and guard.seen[tp] >= records[0].offset:
                    continue  # given to the agent meanwhile
                target = consumer._committed_offset.get(tp)
                target = min(nexts.values()) if target is None else min(int(target), *nexts.values())
                STUCK.labels(guard.name, tp.topic, str(tp.partition)).inc()
                log.warning("stuck partition: records on the broker never given to an idle agent; "
                            "re-seeking to the committed offset",
                            extra={"agent": guard.name, "topic": tp.topic, "partition": tp.partition,
                                   "first_missing": records[0].offset, "highwater": highwater, "seek_to": target})
                await consumer.seek(tp, target)
                break


_apps: dict[int, _AppGuards] = {}


def _for_app(app: Any) -> _AppGuards:
    guards = _apps.get(id(app))
    if guards is None:
        guards = _apps[id(app)] = _AppGuards(app)
    return guards


def guarded_topics() -> set[str]:
    return {t for guards in _apps.values() for g in guards.guards.values() for t in g.topics}


async def guarded(stream: Any, name: str) -> AsyncIterator[Any]:
    """``stream.events()`` of the agent ``name``, with every record of its partitions given once and
    in offset order: ``async for event in guarded(stream, "ingest"):``."""
    if not _ENABLED:
        async for event in stream.events():
            yield event
        return
    app_guards = _for_app(stream.app)
    guard = app_guards.guard(name)
    guard.topics.update(stream.channel.topics if hasattr(stream.channel, "topics") else ())
    consumer = stream.app.consumer
    guard.idle_since = time.monotonic()
    async for event in stream.events():
        guard.idle_since = None
        msg = event.message
        tp, offset = msg.tp, msg.offset
        guard.topics.add(tp.topic)
        last = guard.seen.get(tp)
        if last is not None and offset <= last:
            guard.idle_since = time.monotonic()
            continue  # redelivered after a seek: this agent had it
        expected = last + 1 if last is not None else await app_guards.baseline(tp)
        if offset > expected:
            records = None
            for attempt in range(REREAD_ATTEMPTS):
                try:
                    records = await app_guards.reread(tp, expected, offset)
                    break
                except Exception:
                    log.warning("re-reading skipped offsets failed", exc_info=True,
                                extra={"agent": name, "topic": tp.topic, "partition": tp.partition,
                                       "from": expected, "to": offset - 1, "attempt": attempt + 1})
            if records is None:
                GAP_UNRECOVERED.labels(name, tp.topic, str(tp.partition)).inc()
                log.error("offsets never delivered and not re-readable: continuing past them",
                          extra={"agent": name, "topic": tp.topic, "partition": tp.partition,
                                 "from": expected, "to": offset - 1})
            else:
                if records:
                    GAP_RECOVERED.labels(name, tp.topic, str(tp.partition)).inc(len(records))
                    log.warning("records Faust never delivered to the agent: re-read from the broker and applied",
                                extra={"agent": name, "topic": tp.topic, "partition": tp.partition,
                                       "from": expected, "to": offset - 1, "records": len(records)})
                for rec in records:
                    guard.seen[tp] = rec.offset
                    yield ReplayedEvent(rec.key, rec.value, ReplayedMessage(
                        rec.topic, rec.partition, rec.offset, tp, rec.key, rec.value,
                        rec.timestamp / 1000.0 if rec.timestamp is not None else None, rec.headers))
                # processed (or markers only): the committed offset may move past the range
                await _ORIGINAL_ADD_GAP(consumer, tp, expected, offset - 1)
        guard.seen[tp] = offset
        yield event
        guard.idle_since = time.monotonic()


async def _unguarded_add_gap(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
    """Faust's gap bookkeeping, except on guarded topics: there a jump of the fetched offsets is no
    proof that the skipped offsets hold no record (and Faust's range includes the record being
    delivered); the guard marks a range done once it has re-read and processed it."""
    if tp.topic in guarded_topics():
        return
    await _ORIGINAL_ADD_GAP(self, tp, offset_from, offset_to)


_ORIGINAL_ADD_GAP: Any = None


def install() -> None:
    """Patch Faust's consumer (idempotent); called by make_app."""
    global _ORIGINAL_ADD_GAP
    from faust.transport.consumer import Consumer

    if _ORIGINAL_ADD_GAP is None:
        _ORIGINAL_ADD_GAP = Consumer._add_gap
        Consumer._add_gap = _unguarded_add_gap  # type: ignore[method-assign]
