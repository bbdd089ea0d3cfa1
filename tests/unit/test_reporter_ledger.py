"""The reporter's grouped table records (services/reporter/ledger.py), without Faust: one record per
consumed batch and per acknowledged call; pending = in an event group and in no ack group; a replay
after a crash re-reports nothing acknowledged; expiry by committed offsets; the previous per-event
layout is read after an upgrade."""

from __future__ import annotations

from typing import Any

from services.reporter.ledger import GROUP_MAX, SEP, Ledger


class Table:
    """The store + a log of changelog records, as the app writes them."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.log: list[tuple[int, str, Any]] = []

    def write(self, partition: int, key: str, value: Any) -> None:
        self.log.append((partition, key, value))
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def recovered(self) -> list[tuple[str, Any]]:
        """What a restarted worker recovers: the last record per key (tombstones remove it)."""
        out: dict[str, Any] = {}
        for _, key, value in self.log:
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return list(out.items())


def ev(n: int, tenant: str = "t-a") -> tuple[int, str, dict[str, Any]]:
    return (n, f"{tenant}{SEP}e{n}", {"id": f"m{n}", "tenant_id": tenant, "sent_ts": 1.0})


def test_one_record_per_batch_and_per_ack() -> None:
    t = Table()
    led = Ledger(t.write)
    new = led.add(0, [ev(n) for n in range(10)])
    assert [k for k, _ in new] == [f"t-a{SEP}e{n}" for n in range(10)]
    assert len(t.log) == 1  # ten events, one record
    acked = led.ack([f"t-a{SEP}e{n}" for n in range(4)], now=5.0)
    assert [item["id"] for _, item in acked] == ["m0", "m1", "m2", "m3"]
    assert len(t.log) == 2 and t.log[-1][2]["k"] == [f"t-a{SEP}e{n}" for n in range(4)]
    assert led.ack([f"t-a{SEP}e0", "nope"], now=6.0) == []  # already acknowledged / unknown: nothing written
    assert len(t.log) == 2
    # a big batch is split so no record nears Kafka's size limit
    led.add(1, [ev(n) for n in range(100, 100 + GROUP_MAX + 1)])
    assert len(t.log) == 4


def test_replay_after_a_crash_reports_nothing_acknowledged() -> None:
    t = Table()
    led = Ledger(t.write)
    led.add(0, [ev(n) for n in range(5)])
    led.ack([f"t-a{SEP}e0", f"t-a{SEP}e1"], now=1.0)
    # restart: the table is recovered from the changelog, the events are consumed again
    led2 = Ledger(t.write)
    pending = led2.rebuild(t.recovered(), active={0})
    assert [k for k, _, _ in pending] == [f"t-a{SEP}e{n}" for n in (2, 3, 4)]
    assert led2.add(0, [ev(n) for n in range(5)]) == []  # every one known: none reported again
    assert [k for k, _ in led2.add(0, [ev(5)])] == [f"t-a{SEP}e5"]
    assert led2.rebuild(t.recovered(), active={1}) == []  # not our partition


def test_expiry_follows_the_committed_offset() -> None:
    t = Table()
    led = Ledger(t.write)
    led.add(0, [ev(n) for n in range(3)])  # group up to offset 2
    led.add(0, [ev(n) for n in range(3, 6)])  # group up to offset 5
    led.ack([f"t-a{SEP}e{n}" for n in (0, 1, 3)], now=1.0)
    assert led.expire({0: 2}) == 0  # offset 2 not committed yet: a replay could still need the acks
    assert led.expire({0: 3}) == 1  # first group: its acknowledged entries dropped, e2 still pending
    first = next(v for v in t.data.values() if v.get("g") == "e" and v["o"] == 2)
    assert list(first["r"]) == [f"t-a{SEP}e2"]
    assert len(led.acks) == 1  # the ack group still names e3, whose group is not committed
    led.ack([f"t-a{SEP}e2", f"t-a{SEP}e4", f"t-a{SEP}e5"], now=2.0)
    led.expire({0: 6})
    assert t.data == {} and led.entries == {} and not led.groups and not led.acks  # everything tombstoned
    # after all that, a restart recovers nothing pending
    assert Ledger(t.write).rebuild(t.recovered(), active={0}) == []


def test_previous_layout_is_read_after_an_upgrade() -> None:
    t = Table()
    k0, k1 = f"t-a{SEP}e0", f"t-a{SEP}e1"
    t.write(0, k0, {"r": {"id": "m0", "tenant_id": "t-a", "sent_ts": 1.0}, "p": 0, "o": 10})
    t.write(0, k1, {"a": 5.0, "p": 0, "o": 11})  # an ack marker
    led = Ledger(t.write)
    pending = led.rebuild(t.recovered(), active={0})
    assert [(k, item["id"], p) for k, item, p in pending] == [(k0, "m0", 0)]
    assert led.add(0, [(11, k1, {"id": "m1"})]) == []  # acknowledged before the upgrade: not again
    assert [k for k, _ in led.ack([k0], now=6.0)] == [k0]
    led.expire({0: 12})
    assert t.recovered() == [] and led.entries == {}
