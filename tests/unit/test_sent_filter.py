"""The API's sent-id filter (services/api/sent_filter.py), without a broker: the hand-read prefix of
a DeliveryEvent agrees with the Avro decoder, the Bloom filter has no false negatives, records it
cannot read make their partition fall back to the exact check, and ``candidates`` answers only once
it has read the tenant's partition up to the end offset of the moment of the call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.api.commands import key_partition
from services.api.sent_filter import SEP, ScalableBloom, SentFilter, Untrusted, _fast_fingerprints, sent_key
from services.common.avro import codec


def event(type_: str = "sent", tenant: str = "t-a", mid: str = "m1", account: str | None = "acc",
          **extra: Any) -> dict[str, Any]:
    return {"event_id": f"{tenant}-{mid}-{type_}", "type": type_, "tenant_id": tenant, "account_id": account,
            "message_id": mid, "pk": "pk", "ts": 1_700_000_000_000, "accepted_ts": None, "attempt": 1,
            "smtp_code": 250, "error": None, "deferred_reason": None, "deferred_until": None, "batch_code": None,
            "sender_domain": None, "recipients": 1, **extra}


def test_prefix_reader_agrees_with_the_decoder() -> None:
    fast = _fast_fingerprints()
    assert len(fast) == len(codec().schemas["DeliveryEvent"])  # every version starts the same way
    for ev in (event(), event(account=None), event(mid="ü-ñ-é " * 20, tenant="t-" + "x" * 200),
               event(bounce_type="hard")):
        data = codec().encode("DeliveryEvent", ev)
        assert sent_key(data, fast) == ev["tenant_id"] + SEP + ev["message_id"]
        assert sent_key(data, set()) == sent_key(data, fast)  # the full decoder, same answer
    for type_ in ("deferred", "error", "rejected", "bounce"):
        assert sent_key(codec().encode("DeliveryEvent", event(type_)), fast) is None
    assert sent_key(b"\x00not avro", fast) is None  # poison: nobody counts it
    assert sent_key(None, fast) is None


def test_records_it_cannot_read_are_untrusted() -> None:
    fast = _fast_fingerprints()
    other = codec().encode("ReportAck", {"tenant_id": "t", "event_ids": [], "message_ids": [], "ts": 1})
    with pytest.raises(Untrusted):
        sent_key(other, fast)
    with pytest.raises(Untrusted):  # a schema this process does not know (a newer version)
        sent_key(b"\xc3\x01" + b"\x01" * 8 + b"\x00", fast)


def test_bloom_has_no_false_negatives_and_grows() -> None:
    b = ScalableBloom(capacity=1000, fp_rate=0.01)
    keys = [f"t-a{SEP}m{i}" for i in range(5000)]
    for k in keys:
        b.add(k)
    assert len(b) == 5000 and len(b.filters) >= 3
    assert all(k in b for k in keys)
    false_positives = sum(f"t-a{SEP}other{i}" in b for i in range(10000))
    assert false_positives < 10000 * 0.05


class FakeConsumer:
    def __init__(self, end: int) -> None:
        self.end = end

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.end for tp in tps}


def _filter(end: int, partitions: int = 4) -> tuple[SentFilter, int]:
    f = SentFilter("unused:9092")
    f._consumer = FakeConsumer(end)  # type: ignore[assignment]
    f._partitions = partitions
    f.live = True
    return f, key_partition(b"t-a", partitions)


def test_candidates_waits_for_the_tenants_partition() -> None:
    async def run() -> None:
        f, p = _filter(end=10)
        f.bloom.add(f"t-a{SEP}m1")
        f.positions[p] = 9  # one record of the tenant's partition not read yet
        assert await f.candidates("t-a", ["m1", "m2"], timeout_s=0.05) is None  # cannot tell in time

        async def read_on() -> None:
            await asyncio.sleep(0.05)
            f.bloom.add(f"t-a{SEP}m2")  # the sent event the client was told about
            f.positions[p] = 10
            event, f._progress = f._progress, asyncio.Event()
            event.set()

        task = asyncio.create_task(read_on())
        assert await f.candidates("t-a", ["m1", "m2", "m3"], timeout_s=2.0) == ["m1", "m2"]
        await task
        assert await f.candidates("t-b", ["m1"], timeout_s=0.5) in ([], None)  # another tenant's id space
        f.untrusted.add(p)
        assert await f.candidates("t-a", ["m3"], timeout_s=0.5) is None
        f.untrusted.clear()
        f.live = False  # still loading after a start
        assert await f.candidates("t-a", ["m3"], timeout_s=0.5) is None

    asyncio.run(run())
