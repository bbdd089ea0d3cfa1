"""What the reporter's table holds, in groups: one record per batch of consumed events and one per
acknowledged sync call, instead of a record per event and a marker per report (issue 11: per-event
changelog writes were most of the reporter's Kafka traffic). Pure: it writes through a callback
(``write(partition, key, value or None)``: the app puts it in the table's store and its changelog)
and is unit-tested without Faust.

Records (table key -> JSON value), all on the changelog partition of the events they are about:

- *event group* ``e␟<partition>␟<first offset>`` -> ``{"g": "e", "p": partition, "o": last event
  offset, "r": {event key: report item}}``: the reportable events of one consumed batch (at most
  ``GROUP_MAX`` per record). Event key = ``tenant_id ␟ event_id`` as before.
- *ack group* ``a␟<partition>␟<unique>`` -> ``{"g": "a", "p", "o": last event offset it covers,
  "a": acked unix ts, "k": [event keys]}``: the reports one 2xx acknowledged.

A report is pending while its key is in an event group and in no ack group. The event keys known
(pending or acknowledged) make an event consumed again after a crash a no-op, as the per-event
markers did. Expiry (``expire``, with the consumer group's committed offsets): an event group
whose events are all behind the committed offset loses its acknowledged entries (rewritten with
the pending ones only, or tombstoned when none is left); an ack group is tombstoned once its last
offset is committed and none of its keys is in an event group any more. Records of the previous
layout (one pending entry ``{"r", "p", "o"}`` or marker ``{"a", "p", "o"}`` per event key) are read
as groups of one, so an upgrade keeps every pending report and every acknowledgement.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

SEP = "\x1f"
GROUP_MAX = 250  # entries per event-group record: ~250 x <1 KB stays far below Kafka's 1 MB record limit

Write = Callable[[int, str, Any], None]


@dataclass
class _EventGroup:
    partition: int
    offset: int  # last event offset in it
    items: dict[str, dict[str, Any]]
    acked: set[str] = field(default_factory=set)


@dataclass
class _AckGroup:
    partition: int
    offset: int
    keys: list[str]
    ts: float


class Ledger:
    def __init__(self, write: Write) -> None:
        self._write = write
        self.groups: dict[str, _EventGroup] = {}
        self.acks: dict[str, _AckGroup] = {}
        self.entries: dict[str, str] = {}  # event key -> its event group
        self._seq = itertools.count()
        self._run = f"{time.time_ns():x}"  # ack group keys are unique across restarts

    # -- writes ----------------------------------------------------------------------------------
    def known(self, key: str) -> bool:
        return key in self.entries

    def add(self, partition: int, events: list[tuple[int, str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        """Record the reportable events of one partition from one consumed batch: (offset, event
        key, item), in offset order. Returns the new (key, item) pairs (duplicates of known events
        are skipped, within the batch too)."""
        new: list[tuple[int, str, dict[str, Any]]] = []
        seen: set[str] = set()
        for offset, key, item in events:
            if key in self.entries or key in seen:
                continue
            seen.add(key)
            new.append((offset, key, item))
        for i in range(0, len(new), GROUP_MAX):
            chunk = new[i:i + GROUP_MAX]
            gkey = f"e{SEP}{partition}{SEP}{chunk[0][0]}"
            group = _EventGroup(partition, chunk[-1][0], {key: item for _, key, item in chunk})
            self.groups[gkey] = group
            for _, key, _ in chunk:
                self.entries[key] = gkey
            self._write(partition, gkey, self._event_value(group))
        return [(key, item) for _, key, item in new]

    def ack(self, keys: Iterable[str], now: float) -> list[tuple[str, dict[str, Any]]]:
        """Acknowledge reports: one ack group per partition. Returns the (key, item) pairs that were
        pending (keys already acknowledged or unknown are left out)."""
        by_partition: dict[int, list[str]] = {}
        out: list[tuple[str, dict[str, Any]]] = []
        for key in keys:
            group = self.groups.get(self.entries.get(key, ""))
            if group is None or key in group.acked:
                continue
            group.acked.add(key)
            by_partition.setdefault(group.partition, []).append(key)
            out.append((key, group.items[key]))
        for partition, acked in by_partition.items():
            offset = max(self.groups[self.entries[k]].offset for k in acked)
            akey = f"a{SEP}{partition}{SEP}{self._run}-{next(self._seq)}"
            self.acks[akey] = _AckGroup(partition, offset, acked, now)
            self._write(partition, akey, {"g": "a", "p": partition, "o": offset, "a": now, "k": list(acked)})
        return out

    def expire(self, committed: dict[int, int]) -> int:
        """Drop what the committed offsets made useless (see the module doc). Returns the number of
        records rewritten or tombstoned."""
        n = 0
        for gkey, group in list(self.groups.items()):
            done = committed.get(group.partition)
            if done is None or group.offset >= done or not group.acked:
                continue
            for key in group.acked:
                self.entries.pop(key, None)
                group.items.pop(key, None)
            group.acked = set()
            if group.items:
                self._write(group.partition, gkey, self._event_value(group))
            else:
                del self.groups[gkey]
                self._write(group.partition, gkey, None)
            n += 1
        for akey, ack in list(self.acks.items()):
            done = committed.get(ack.partition)
            if done is None or ack.offset >= done or any(self.entries.get(k) for k in ack.keys):
                continue  # "" = acknowledged, its event group already gone: not in the way
            del self.acks[akey]
            for key in ack.keys:
                if self.entries.get(key) == "":
                    del self.entries[key]
            self._write(ack.partition, akey, None)
            n += 1
        return n

    # -- recovery --------------------------------------------------------------------------------
    def rebuild(self, records: Iterable[tuple[str, Any]], active: set[int]) -> list[tuple[str, dict[str, Any], int]]:
        """Rebuild from the table's records of our partitions; returns the pending reports
        (event key, item, partition) in offset order."""
        self.groups.clear()
        self.acks.clear()
        self.entries.clear()
        acked: set[str] = set()
        for key, value in records:
            if not isinstance(value, dict) or value.get("p") not in active:
                continue
            kind = value.get("g")
            if kind == "e":
                group = _EventGroup(value["p"], int(value.get("o", -1)), dict(value.get("r") or {}))
            elif kind == "a":
                self.acks[key] = _AckGroup(value["p"], int(value.get("o", -1)), list(value.get("k") or []),
                                           float(value.get("a") or 0))
                acked.update(self.acks[key].keys)
                continue
            elif "r" in value:  # previous layout: one pending entry per event key
                group = _EventGroup(value["p"], int(value.get("o", -1)), {key: value["r"]})
            elif "a" in value:  # previous layout: one ack marker per event key
                self.acks[key] = _AckGroup(value["p"], int(value.get("o", -1)), [key], float(value["a"]))
                acked.add(key)
                continue
            else:
                continue
            self.groups[key] = group
            for ekey in group.items:
                self.entries[ekey] = key
        pending: list[tuple[int, str, dict[str, Any], int]] = []
        for key in acked:
            gkey = self.entries.get(key)
            if gkey is not None:
                self.groups[gkey].acked.add(key)
            else:  # its group is gone: the marker alone keeps a replayed event from re-reporting
                self.entries[key] = ""
        for group in self.groups.values():
            for ekey, item in group.items.items():
                if ekey not in group.acked:
                    pending.append((group.offset, ekey, item, group.partition))
        pending.sort(key=lambda p: p[0])
        return [(ekey, item, partition) for _, ekey, item, partition in pending]

    def drop_partitions(self, partitions: set[int]) -> None:
        for gkey in [k for k, g in self.groups.items() if g.partition in partitions]:
            for ekey in self.groups.pop(gkey).items:
                self.entries.pop(ekey, None)
        for akey in [k for k, a in self.acks.items() if a.partition in partitions]:
            for ekey in self.acks.pop(akey).keys:
                if self.entries.get(ekey) == "":
                    del self.entries[ekey]

    @staticmethod
    def _event_value(group: _EventGroup) -> dict[str, Any]:
        # a copy: the record is serialized later, when Faust's buffer sends it
        return {"g": "e", "p": group.partition, "o": group.offset, "r": dict(group.items)}

    def item(self, key: str) -> dict[str, Any] | None:
        group = self.groups.get(self.entries.get(key, ""))
        return None if group is None else group.items.get(key)
