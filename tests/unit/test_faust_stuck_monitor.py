"""The stuck-partition monitor of the offset guard (services/common/faust_guard.py ``_check``): records
on the broker that idle agents were never given are re-read, counted in
``postbus_faust_stuck_partitions_total`` and the partition re-seeked to the committed offset; while
a sibling agent of the partition is still busy (Faust holds back the delivery of a record to every
agent until each queue takes it) nothing is flagged. bench/chaos.py measured ~200 re-seeks under load
before that condition: each one re-fetched the whole backlog from the committed offset."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from services.common import faust_guard as fg

T = "postbus.commands"
TP0 = TP(T, 0)


class Consumer:
    def __init__(self, committed: int, highwater: int) -> None:
        self._committed_offset = {TP0: committed}
        self._highwater = highwater
        self.flow_active = True
        self.seeks: list[tuple[TP, int]] = []

    def assignment(self) -> set[TP]:
        return {TP0}

    def highwater(self, tp: TP) -> int:
        return self._highwater

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def app(committed: int, highwater: int) -> Any:
    return SimpleNamespace(
        consumer=Consumer(committed, highwater), rebalancing=False, conf=SimpleNamespace(id="postbus-sender"),
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=SimpleNamespace(is_set=lambda: True))),
        flow_control=SimpleNamespace(is_active=lambda: True),
        on_partitions_revoked=SimpleNamespace(connect=lambda fun: fun),
        on_before_shutdown=SimpleNamespace(connect=lambda fun: fun), _postbus_bootstrap="unused")


@pytest.fixture
def on_broker(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Offsets of the data records on the broker (the rest are transaction markers)."""
    records: set[int] = set()

    async def reread(self: Any, tp: TP, start: int, end: int) -> list[Any]:
        return [SimpleNamespace(offset=o) for o in range(start, end) if o in records]

    monkeypatch.setattr(fg._AppGuards, "reread", reread)
    return records


def guards(a: Any, idle: dict[str, float | None], seen: int) -> fg._AppGuards:
    ag = fg._AppGuards(a)
    now = time.monotonic()
    for name, idle_for in idle.items():
        ag.guards[name] = fg._Guard(a, name, topics={T}, seen={TP0: seen},
                                    idle_since=None if idle_for is None else now - idle_for)
    return ag


def stuck(agent: str) -> float:
    return fg.STUCK.labels(agent, T, "0")._value.get()


def test_records_idle_agents_never_got_are_counted_and_reseeked(on_broker: set[int]) -> None:
    on_broker.update({5, 6, 7})
    a = app(committed=5, highwater=8)
    before = stuck("ingest") + stuck("domain_commands")
    asyncio.run(guards(a, {"ingest": 20.0, "domain_commands": 20.0}, seen=4)._check())
    assert stuck("ingest") + stuck("domain_commands") - before == 1
    assert a.consumer.seeks == [(TP0, 5)]  # to the committed offset; the guard skips what was given


def test_nothing_flagged_while_a_sibling_agent_is_busy(on_broker: set[int]) -> None:
    on_broker.update({5, 6, 7})
    a = app(committed=5, highwater=8)
    before = stuck("domain_commands")
    # domain_commands idle for 20 s, ingest busy with a record (or idle only briefly): backpressure
    for ingest_idle in (None, 1.0):
        asyncio.run(guards(a, {"ingest": ingest_idle, "domain_commands": 20.0}, seen=4)._check())
    assert stuck("domain_commands") == before
    assert a.consumer.seeks == []


def test_markers_only_beyond_are_not_a_stuck_partition(on_broker: set[int]) -> None:
    a = app(committed=5, highwater=7)  # offsets 5 and 6: transaction markers
    before = stuck("ingest") + stuck("domain_commands")
    ag = guards(a, {"ingest": 20.0, "domain_commands": 20.0}, seen=4)
    asyncio.run(ag._check())
    assert stuck("ingest") + stuck("domain_commands") == before and a.consumer.seeks == []
    assert ag.guards["ingest"].checked[TP0] == (5, 7)  # found clean: not re-read again
