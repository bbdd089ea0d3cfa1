"""The sender's ``messages`` table on disk (services/sender/message_store.py): a value reaches RocksDB
only once its changelog record is acknowledged, and the persisted offset (where a restart's recovery
starts) never passes a record of ours that is not in the database yet.

A real Faust table with its real RocksDB store (rocksdict) in a temporary folder; the producer is
replaced by futures the test resolves, so "acknowledged" happens when the test says."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from services.sender.message_store import ROCKSDB_OPTIONS, MessageStore

P = 3  # the partition every record here goes to


class Producer:
    """Hand-overs in order; each resolved by the test with the offset of its last record."""

    def __init__(self) -> None:
        self.handed: list[tuple[list[tuple[int, bytes, bytes]], asyncio.Future[Any]]] = []

    async def hand_over(self, records: list[tuple[int, bytes, bytes]]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.handed.append((records, fut))
        return fut

    def ack(self, i: int, offset: int) -> None:
        _, fut = self.handed[i]
        topic = "sender-messages-changelog"
        fut.set_result([RecordMetadata(topic, P, TopicPartition(topic, P), offset, 0, 0, 0)])


@pytest.fixture
def store(tmp_path: Path) -> tuple[MessageStore, Producer, Any]:
    app = faust.App("store-test", broker="kafka://127.0.0.1:1", store="memory://", datadir=str(tmp_path),
                    autodiscover=False, web_enabled=False)
    table = app.Table("messages", partitions=8, store="rocksdb:messages", options=ROCKSDB_OPTIONS)
    producer = Producer()
    s = MessageStore(table, producer.hand_over)
    s.db._db_for_partition(P)  # the partition is assigned (Faust opens its database then)
    return s, producer, table


async def write_durably(s: MessageStore, producer: Producer, key: str, value: dict[str, Any], offset: int) -> None:
    """The whole path of one value: overlay, hand-over, acknowledged at ``offset``, applied."""
    s.set_local(key, value)
    applied = await s.append([(P, key, value)])
    producer.ack(len(producer.handed) - 1, offset)
    await asyncio.wait_for(applied, 1)


def on_disk(s: MessageStore, key: str) -> dict[str, Any] | None:
    raw = s.db._dbs[P].get(s.db._encode_key(key))
    return None if raw is None else json.loads(raw)


def persisted(s: MessageStore) -> int | None:
    return s.db.persisted_offset(TopicPartition(s.table.changelog_topic.get_topic_name(), P))


async def test_a_value_reaches_the_database_only_when_acknowledged(store) -> None:
    s, producer, _ = store
    value = {"s": "pending", "p": P, "q": 1000, "m": {"id": "m1"}}
    s.set_local("t\x1fm1", value)
    applied = await s.append([(P, "t\x1fm1", value)])
    assert s.get("t\x1fm1") is value  # the engine sees its own write at once ...
    assert on_disk(s, "t\x1fm1") is None and persisted(s) is None  # ... the disk does not, yet
    producer.ack(0, 41)
    await asyncio.wait_for(applied, 1)
    assert on_disk(s, "t\x1fm1") == value and persisted(s) == 41
    assert "t\x1fm1" not in s.overlay and s.get("t\x1fm1") == value  # now from the database (or its hot cache)


async def test_the_persisted_offset_waits_for_every_outstanding_hand_over(store) -> None:
    s, producer, _ = store
    a, b = {"s": "pending", "p": P, "q": 1}, {"s": "pending", "p": P, "q": 2}
    s.set_local("t\x1fa", a)
    s.set_local("t\x1fb", b)
    first = await s.append([(P, "t\x1fa", a)])
    second = await s.append([(P, "t\x1fb", b)])
    producer.ack(1, 50)  # the later hand-over first (other batches may resolve in any order)
    await asyncio.wait_for(second, 1)
    assert on_disk(s, "t\x1fb") == b
    assert persisted(s) is None  # record a (offset < 50) is not in the database: a restart must read it
    producer.ack(0, 45)
    await asyncio.wait_for(first, 1)
    assert on_disk(s, "t\x1fa") == a and persisted(s) == 50


async def test_a_value_replaced_meanwhile_stays_in_the_overlay(store) -> None:
    s, producer, _ = store
    pending = {"s": "pending", "p": P, "q": 1}
    sent = {"s": "sent", "p": P, "ts": 1}
    s.set_local("t\x1fm", pending)
    applied = await s.append([(P, "t\x1fm", pending)])
    s.set_local("t\x1fm", sent)  # the outcome, handed to the group commit before the first ack
    producer.ack(0, 7)
    await asyncio.wait_for(applied, 1)
    assert on_disk(s, "t\x1fm") == pending  # durable so far
    assert s.get("t\x1fm") is sent  # the newest value wins until its own record is acknowledged


async def test_a_revoked_partition_is_not_written(store) -> None:
    s, producer, _ = store
    control = {"s": "pending", "p": P, "q": 1}
    await write_durably(s, producer, "t\x1fc", control, 5)
    assert on_disk(s, "t\x1fc") == control and persisted(s) == 5  # positive control: written
    value = {"s": "sent", "p": P, "ts": 2}
    s.set_local("t\x1fc", value)
    applied = await s.append([(P, "t\x1fc", value)])
    db = s.db._dbs.pop(P)  # Faust closes a revoked partition's database
    s.forget({P})
    assert s.get("t\x1fc") is None or s.get("t\x1fc") != value  # the overlay value went with the partition
    producer.ack(1, 6)
    await asyncio.wait_for(applied, 1)
    s.db._dbs[P] = db
    assert on_disk(s, "t\x1fc") == control and persisted(s) == 5  # the next owner recovers it from the changelog


async def test_a_failed_hand_over_writes_nothing_and_raises(store) -> None:
    s, producer, _ = store
    value = {"s": "pending", "p": P, "q": 1}
    s.set_local("t\x1fx", value)
    applied = await s.append([(P, "t\x1fx", value)])
    producer.handed[0][1].set_exception(RuntimeError("broker gone"))
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(applied, 1)
    assert on_disk(s, "t\x1fx") is None and s.get("t\x1fx") is value and s.outstanding[P] == 0
    await write_durably(s, producer, "t\x1fx", value, 9)  # the engine retries
    assert on_disk(s, "t\x1fx") == value and persisted(s) == 9


async def test_items_and_keys_merge_the_overlay_over_the_database(store) -> None:
    s, producer, _ = store
    old = {"s": "pending", "p": P, "q": 1}
    s.set_local("t\x1fa", old)
    s.set_local("t\x1fb", {"s": "pending", "p": P, "q": 2})
    applied = await s.append([(P, "t\x1fa", old), (P, "t\x1fb", s.get("t\x1fb"))])
    producer.ack(0, 3)
    await asyncio.wait_for(applied, 1)
    new = {"s": "sent", "p": P, "ts": 3}
    s.set_local("t\x1fa", new)
    s.set_local("u\x1fc", {"s": "pending", "p": P, "q": 4})
    items = dict(s.items())
    assert items == {"t\x1fa": new, "t\x1fb": {"s": "pending", "p": P, "q": 2},
                     "u\x1fc": {"s": "pending", "p": P, "q": 4}}
    assert sorted(s.keys()) == ["t\x1fa", "t\x1fb", "u\x1fc"]


async def test_reads_of_a_cold_entry_come_from_the_database(store, monkeypatch) -> None:
    """Beyond the hot cache of recently written entries, a read decodes the database's bytes."""
    import services.sender.message_store as ms

    monkeypatch.setattr(ms, "HOT_ENTRIES", 1)
    s, producer, _ = store
    first = {"s": "pending", "p": P, "q": 1}
    await write_durably(s, producer, "t\x1fold", first, 1)
    assert s.get("t\x1fold") is first  # positive control: served from the hot cache
    await write_durably(s, producer, "t\x1fnew", {"s": "pending", "p": P, "q": 2}, 2)
    cold = s.get("t\x1fold")
    assert cold == first and cold is not first  # pushed out of the cache: decoded from RocksDB
