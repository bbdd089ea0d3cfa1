"""The command log (audit): read straight from ``postbus.commands``, the source of truth.

Each request uses a short-lived consumer (no group, read_committed): it assigns the partitions to
read, seeks to the cursor / ``since`` / beginning, and stops at the end offsets taken at request
start, so a page or an export is a consistent snapshot. Partitions are merged by record timestamp.
Commands are keyed by tenant, so a ``tenant_id`` filter reads only that tenant's partition.

Every command on the topic was accepted: the API appends only after validation (and aborted
transactions are invisible under read_committed), hence ``outcome = "accepted"``."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from services.common.avro import DecodeError, codec
from services.common.redaction import redact  # the one redaction rule (also the CLI's)
from services.common.topics import COMMANDS, TopicMissing, topic_partitions

log = logging.getLogger("postbus.api.command_log")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SEEK_SLACK_MS = 60_000  # producer clocks vs envelope ts: seek a little early, filter exactly
STALL_POLLS = 50  # empty polls (x 200 ms) before a partition that does not reach its end is given up


class InvalidCursor(ValueError):
    pass


class CommandLogUnavailable(RuntimeError):
    pass


def encode_cursor(offsets: dict[int, int]) -> str:
    raw = json.dumps({"v": 1, "o": {str(p): o for p, o in sorted(offsets.items())}}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        offsets = {int(p): int(o) for p, o in data["o"].items()}
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidCursor("cursor is not valid") from exc
    if data.get("v") != 1 or any(p < 0 or o < 0 for p, o in offsets.items()):
        raise InvalidCursor("cursor is not valid")
    return offsets


def to_ms(value: float | None) -> int | None:
    """Unix seconds; a value above 1e11 is taken as milliseconds already."""
    if value is None:
        return None
    return int(value) if value > 1e11 else int(value * 1000)


def partition_for(tenant_id: str, partitions: int) -> int:
    """The partition the producer's default partitioner picks for a tenant key."""
    return (murmur2(tenant_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Filters:
    tenant_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    route: str | None = None
    type: str | None = None

    def match(self, entry: dict[str, Any]) -> bool:
        if self.tenant_id is not None and entry["tenant_id"] != self.tenant_id:
            return False
        if self.since_ms is not None and entry["ts"] < self.since_ms:
            return False
        if self.until_ms is not None and entry["ts"] > self.until_ms:
            return False
        if self.type is not None and entry["type"] != self.type:
            return False
        if self.route is not None:
            route = entry.get("route") or ""
            # "POST /tenant" or just "/tenant"
            if self.route != route and self.route != route.partition(" ")[2]:
                return False
        return True


def entry_of(rec: Any) -> dict[str, Any] | None:
    """The redacted audit entry of one command record; None for a record that is not a command."""
    c = codec()
    try:
        _, env = c.decode(rec.value, expect="CommandEnvelope")
    except DecodeError:
        return None
    try:
        _, payload = c.decode(env["payload"], expect=env["payload_schema"])
        shown: Any = redact(payload)
    except (DecodeError, KeyError):
        shown = {"_undecodable": True}
    return {
        "command_id": env["command_id"],
        "ts": env["ts"],
        "type": env["type"],
        "tenant_id": env.get("tenant_id"),
        "actor": env["actor"],
        "route": env.get("route"),
        "payload_schema": env["payload_schema"],
        "payload": shown,
        "outcome": "accepted",
        "partition": rec.partition,
        "offset": rec.offset,
    }


class CommandLogReader:
    """One snapshot read of the command topic. Use as ``async with``."""

    def __init__(self, bootstrap: str, filters: Filters, cursor: dict[int, int] | None = None) -> None:
        self.bootstrap = bootstrap
        self.filters = filters
        self.cursor = cursor
        self.consumer: AIOKafkaConsumer | None = None
        self.next_offsets: dict[int, int] = {}  # partition -> first offset not yet consumed by the merge
        self._buffers: dict[TopicPartition, deque[Any]] = {}
        self._ends: dict[TopicPartition, int] = {}
        self._done: set[TopicPartition] = set()

    async def __aenter__(self) -> CommandLogReader:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", fetch_max_wait_ms=50, request_timeout_ms=15000,
        )
        await self.consumer.start()
        try:
            await self._position()
        except BaseException:
            await self.consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def _position(self) -> None:
        assert self.consumer is not None
        try:
            parts = set(await topic_partitions(self.consumer, COMMANDS))
        except TopicMissing as exc:
            raise CommandLogUnavailable(str(exc)) from exc
        if self.filters.tenant_id is not None:
            parts = {partition_for(self.filters.tenant_id, len(parts))}
        tps = [TopicPartition(COMMANDS, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        begins = await self.consumer.beginning_offsets(tps)
        self._ends = await self.consumer.end_offsets(tps)
        starts = dict(begins)
        if self.filters.since_ms is not None:
            found = await self.consumer.offsets_for_times(
                {tp: max(0, self.filters.since_ms - SEEK_SLACK_MS) for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) else self._ends[tp]) for tp in tps}
        for tp in tps:
            if self.cursor is not None and tp.partition in self.cursor:
                starts[tp] = max(begins[tp], self.cursor[tp.partition])
            self.next_offsets[tp.partition] = starts[tp]
            self._buffers[tp] = deque()
            if starts[tp] >= self._ends[tp]:
                self._done.add(tp)
            else:
                self.consumer.seek(tp, starts[tp])

    async def _refill(self) -> None:
        assert self.consumer is not None
        need = [tp for tp in self._buffers if not self._buffers[tp] and tp not in self._done]
        empty_polls = 0
        while need:
            batch = await self.consumer.getmany(*need, timeout_ms=200, max_records=500)
            got = False
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset < self._ends[tp]:
                        self._buffers[tp].append(rec)
                        got = True
            for tp in need:
                # transaction markers take offsets too: the position, not the records, says we are done
                if await self.consumer.position(tp) >= self._ends[tp]:
                    self._done.add(tp)
            empty_polls = 0 if got else empty_polls + 1
            if empty_polls >= STALL_POLLS:
                log.warning("command log read stalled", extra={"partitions": [tp.partition for tp in need]})
                self._done.update(need)
            need = [tp for tp in need if not self._buffers[tp] and tp not in self._done]

    def exhausted(self) -> bool:
        return all(not b for b in self._buffers.values()) and len(self._done) == len(self._buffers)

    async def entries(self) -> AsyncIterator[dict[str, Any]]:
        """Matching entries, partitions merged by record timestamp."""
        while True:
            await self._refill()
            heads = [tp for tp, buf in self._buffers.items() if buf]
            if not heads:
                return
            tp = min(heads, key=lambda t: (self._buffers[t][0].timestamp, t.partition))
            rec = self._buffers[tp].popleft()
            self.next_offsets[tp.partition] = rec.offset + 1
            if self.filters.until_ms is not None and rec.timestamp > self.filters.until_ms + SEEK_SLACK_MS:
                # this partition is past the window: stop reading it
                self._buffers[tp].clear()
                self._done.add(tp)
                continue
            entry = entry_of(rec)
            if entry is not None and self.filters.match(entry):
                yield entry


async def read_page(bootstrap: str, filters: Filters, cursor: str | None,
                    limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` entries and the cursor of the next page (None when nothing is left)."""
    limit = max(1, min(limit, MAX_LIMIT))
    start = decode_cursor(cursor) if cursor else None
    out: list[dict[str, Any]] = []
    async with CommandLogReader(bootstrap, filters, start) as reader, aclosing(reader.entries()) as entries:
        async for entry in entries:
            out.append(entry)
            if len(out) >= limit:
                break
        if len(out) < limit:
            return out, None
        await reader._refill()
        return out, None if reader.exhausted() else encode_cursor(reader.next_offsets)


async def open_export(bootstrap: str, filters: Filters) -> AsyncIterator[bytes]:
    """Opens the snapshot now (so errors surface before the response starts) and returns the
    stream of every matching entry as one JSON line, in merged topic order."""
    reader = await CommandLogReader(bootstrap, filters).__aenter__()

    async def lines() -> AsyncIterator[bytes]:
        try:
            async with aclosing(reader.entries()) as entries:
                async for entry in entries:
                    yield (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        finally:
            await reader.__aexit__(None, None, None)

    return lines()
