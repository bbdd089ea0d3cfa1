"""Which of a tenant's ids may already have been sent, answered in this process (issue 11).

add-messages refuses an id whose sent report the client already has ("already sent"). The exact
answer is in the metrics service (``sent_ids``, after a wait for its ingest to reach the tenant's
delivery events): an HTTP round trip to it plus a projection wait per call, which cost the API a
third of its CPU with small calls, and the metrics service as much again. Almost every id of a call
was never sent, so this process keeps a Bloom filter of every ``sent`` event of ``postbus.events``
(read from the beginning, no consumer group; the topic is kept forever) and asks the metrics service
only about the ids the filter cannot rule out.

Why no id whose sent event came before the call is missed: before answering, :meth:`candidates`
reads the committed end offset of the tenant's partition from the broker (records are keyed by
tenant) and waits until this filter has read up to it, so every sent event the client could have
been told about is in the filter; a Bloom filter has no false negatives. Its false positives only
send an id to the exact check. When it cannot be sure (still loading after a start, broker not
answering, not caught up in time, a partition that does not start at offset 0, or a record it does
not understand, e.g. a newer event schema): ``None``, and the caller does the exact check for all.

Memory: about 1.2 bytes per sent id (1 % false positives); a filter that fills up is followed by
one twice its size, so the false-positive rate stays bounded as history grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.api.commands import key_partition
from services.common.avro import MAGIC, DecodeError, codec, read_long
from services.common.topics import EVENTS, topic_partitions

log = logging.getLogger("postbus.api.sent_filter")

SEP = "\x1f"
# the fields every DeliveryEvent version starts with; records of such a version are read by hand
# (the first five fields only: a sent filter needs type, tenant_id and message_id)
_PREFIX = (("event_id", "string"), ("type", "string"), ("tenant_id", "string"),
           ("account_id", ("null", "string")), ("message_id", "string"))


class _Bloom:
    """A Bloom filter of strings, ``k`` bit positions by double hashing of Python's 64-bit hash
    (seeded per process: the filter never leaves it)."""

    def __init__(self, capacity: int, fp_rate: float) -> None:
        self.capacity = capacity
        self.m = max(64, int(-capacity * math.log(fp_rate) / (math.log(2) ** 2)))
        self.k = max(1, round(self.m / capacity * math.log(2)))
        self.bits = bytearray((self.m + 7) // 8)
        self.count = 0

    def add(self, key: str) -> None:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        pos, step, m, bits = h & 0xFFFFFFFF, (h >> 32) | 1, self.m, self.bits
        for _ in range(self.k):
            pos %= m
            bits[pos >> 3] |= 1 << (pos & 7)
            pos += step
        self.count += 1

    def __contains__(self, key: str) -> bool:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        pos, step, m, bits = h & 0xFFFFFFFF, (h >> 32) | 1, self.m, self.bits
        for _ in range(self.k):
            pos %= m
            if not bits[pos >> 3] & (1 << (pos & 7)):
                return False
            pos += step
        return True


class ScalableBloom:
    def __init__(self, capacity: int = 1 << 20, fp_rate: float = 0.01) -> None:
        self.fp_rate = fp_rate
        self.filters = [_Bloom(capacity, fp_rate)]

    def add(self, key: str) -> None:
        last = self.filters[-1]
        if last.count >= last.capacity:
            last = _Bloom(last.capacity * 2, self.fp_rate)
            self.filters.append(last)
        last.add(key)

    def __contains__(self, key: str) -> bool:
        return any(key in f for f in self.filters)

    def __len__(self) -> int:
        return sum(f.count for f in self.filters)


def _fast_fingerprints() -> set[bytes]:
    """Writer fingerprints of the DeliveryEvent versions whose first fields are ``_PREFIX``."""
    out = set()
    for version in codec().schemas.get("DeliveryEvent", []):
        fields = version.parsed.get("fields", [])
        got = tuple((f["name"], tuple(f["type"]) if isinstance(f["type"], list) else f["type"])
                    for f in fields[:len(_PREFIX)])
        if got == _PREFIX:
            out.add(version.fingerprint)
    return out


class Untrusted(Exception):
    """A record this filter cannot read: its partition falls back to the exact check."""


def sent_key(data: bytes | None, fast: set[bytes]) -> str | None:
    """``tenant_id SEP message_id`` of a sent DeliveryEvent record, None for other events and for
    records that are not Postbus Avro at all (poison: no consumer counts them). Raises
    :class:`Untrusted` for an Avro record of a schema this process cannot read as a DeliveryEvent."""
    if not data or len(data) < 10 or data[:2] != MAGIC:
        return None
    if data[2:10] in fast:
        try:
            n, i = read_long(data, 10)
            i += n  # event_id
            n, i = read_long(data, i)
            if data[i:i + n] != b"sent":
                return None
            i += n
            n, i = read_long(data, i)
            tenant = data[i:i + n]
            i += n
            branch, i = read_long(data, i)  # account_id: null | string
            if branch == 1:
                n, i = read_long(data, i)
                i += n
            n, i = read_long(data, i)
            if i + n > len(data):
                raise IndexError("truncated")
            return tenant.decode() + SEP + data[i:i + n].decode()
        except (IndexError, UnicodeDecodeError):
            return None  # a corrupt body: the metrics ingest dead-letters it, nobody counts it
    try:
        name, ev = codec().decode(data)
    except DecodeError as exc:
        raise Untrusted(str(exc)) from None  # e.g. a newer schema than this process knows
    if name != "DeliveryEvent":
        raise Untrusted(f"a {name} record on {EVENTS}")
    return ev["tenant_id"] + SEP + ev["message_id"] if ev.get("type") == "sent" else None


class SentFilter:
    def __init__(self, bootstrap: str, capacity: int = 1 << 20, fp_rate: float = 0.01) -> None:
        self.bootstrap = bootstrap
        self.bloom = ScalableBloom(capacity, fp_rate)
        self.positions: dict[int, int] = {}  # partition -> next offset read
        self.untrusted: set[int] = set()
        self.live = False  # has read everything that was on the topic at start
        self._start_ends: dict[int, int] = {}
        self._partitions = 0
        self._fast = _fast_fingerprints()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()

    async def start(self) -> None:
        """Starts reading in the background; the filter answers once it has caught up."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    isolation_level="read_committed", auto_offset_reset="earliest",
                                    client_id="postbus-api-sent-filter")
        await consumer.start()
        try:
            tps = [TopicPartition(EVENTS, p) for p in await topic_partitions(consumer, EVENTS, 100)]
            consumer.assign(tps)
            starts = await consumer.beginning_offsets(tps)
            self._start_ends = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        except BaseException:
            await consumer.stop()
            raise
        # a partition whose first records are gone (retention changed, topic truncated) cannot be
        # trusted: sent events may be missing from it
        self.untrusted = {tp.partition for tp, o in starts.items() if o > 0}
        await consumer.seek_to_beginning(*tps)
        self._partitions = len(tps)
        self._consumer = consumer
        self._check_live()
        self._task = asyncio.create_task(self._run(), name="api-sent-filter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        self._consumer = self._task = None

    def _check_live(self) -> None:
        if not self.live and all(self.positions.get(p, 0) >= o for p, o in self._start_ends.items()):
            self.live = True
            log.info("sent filter loaded", extra={"sent_ids": len(self.bloom), "untrusted": sorted(self.untrusted)})

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer, fast, bloom = self._consumer, self._fast, self.bloom
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10000)
                for tp, records in batches.items():
                    if tp.partition in self.untrusted:
                        continue
                    for rec in records:
                        try:
                            key = sent_key(rec.value, fast)
                        except Untrusted as exc:
                            self.untrusted.add(tp.partition)
                            log.warning("unreadable event: this partition is checked by the metrics service only",
                                        extra={"partition": tp.partition, "offset": rec.offset, "reason": str(exc)})
                            break
                        if key is not None:
                            bloom.add(key)
                for tp in consumer.assignment():  # also past transaction markers
                    pos = await consumer.position(tp)
                    if pos != self.positions.get(tp.partition):
                        self.positions[tp.partition] = pos
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sent filter read failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            self._check_live()
            event, self._progress = self._progress, asyncio.Event()
            event.set()

    async def candidates(self, tenant_id: str, ids: list[str], timeout_s: float) -> list[str] | None:
        """The ids among ``ids`` that may have a sent event committed before this call (a superset
        of those that do), or None when this filter cannot tell (then check them all exactly)."""
        consumer = self._consumer
        if consumer is None or not self.live or not self._partitions:
            return None
        partition = key_partition(tenant_id.encode(), self._partitions)
        if partition in self.untrusted:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tp = TopicPartition(EVENTS, partition)
        try:
            ends = await asyncio.wait_for(consumer.end_offsets([tp]), timeout_s)
            end = int(ends[tp])
            while self.positions.get(partition, 0) < end:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await asyncio.wait_for(self._progress.wait(), remaining)
        except Exception as exc:  # broker slow or unreachable: the exact check decides
            log.debug("sent filter cannot answer", extra={"tenant_id": tenant_id, "error": repr(exc)})
            return None
        if partition in self.untrusted:
            return None
        prefix = tenant_id + SEP
        return [i for i in ids if prefix + i in self.bloom]

    def status(self) -> dict[str, Any]:
        return {"live": self.live, "sent_ids": len(self.bloom), "untrusted": sorted(self.untrusted),
                "filters": len(self.bloom.filters)}
