"""The offset guard of the command-consuming agents (services/common/faust_guard.py), on a fake
stream: records Faust skipped are re-read and handed over in order, redeliveries are skipped, and
the committed offset may move past a range only once the guard has processed it. The real defect
and the real fix are exercised in tests/integration/test_rebalance_loss.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from services.common import faust_guard as fg

T = "postbus.commands"
TP0 = TP(T, 0)


@dataclass
class Msg:
    offset: int
    topic: str = T
    partition: int = 0

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


@dataclass
class Event:
    message: Msg
    key: bytes = b"k"
    value: bytes = b""


@dataclass
class Rec:  # what aiokafka returns
    offset: int
    topic: str = T
    partition: int = 0
    key: bytes = b"k"
    value: bytes = b""
    timestamp: int = 0
    headers: tuple = ()


@dataclass
class Consumer:
    committed: dict[TP, int | None]
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def _committed_offset(self) -> dict[TP, int | None]:
        return self.committed


class App:
    def __init__(self, committed: int | None) -> None:
        self.consumer = Consumer({TP0: committed})
        self.conf = SimpleNamespace(id="postbus-sender")
        self.on_partitions_revoked = SimpleNamespace(connect=lambda fun: fun)
        self.on_before_shutdown = SimpleNamespace(connect=lambda fun: fun)
        self._postbus_bootstrap = "unused"


class Stream:
    def __init__(self, app: App, offsets: list[int]) -> None:
        self.app = app
        self.channel = SimpleNamespace(topics=(T,))
        self.offsets = offsets

    async def events(self) -> Any:
        for offset in self.offsets:
            yield Event(Msg(offset))


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Data records on the broker (offsets), re-read calls, gaps marked; no monitor task."""
    state: dict[str, Any] = {"records": set(), "rereads": []}

    async def reread(self: Any, tp: TP, start: int, end: int) -> list[Rec]:
        state["rereads"].append((start, end))
        return [Rec(o) for o in range(start, end) if o in state["records"]]

    async def add_gap(consumer: Consumer, tp: TP, offset_from: int, offset_to: int) -> None:
        consumer.gaps.append((offset_from, offset_to))

    async def no_watch(self: Any) -> None:
        return None

    monkeypatch.setattr(fg._AppGuards, "reread", reread)
    monkeypatch.setattr(fg._AppGuards, "_watch", no_watch)
    monkeypatch.setattr(fg, "_ORIGINAL_ADD_GAP", add_gap)
    monkeypatch.setattr(fg, "_ENABLED", True)
    return state


def run(stream: Stream, name: str = "ingest") -> list[int]:
    async def go() -> list[int]:
        return [event.message.offset async for event in fg.guarded(stream, name)]
    return asyncio.run(go())


def test_skipped_records_are_reread_in_order_and_redeliveries_skipped(broker: dict[str, Any]) -> None:
    broker["records"] = {10, 11, 12, 14, 15, 16}  # 13: a transaction marker (no record)
    app = App(committed=10)
    before = fg.GAP_RECOVERED.labels("agent-a", T, "0")._value.get()
    # Faust gives 10, 11, then 15 (12..14 fetched and lost), then 13 again after a seek, then 16
    assert run(Stream(app, [10, 11, 15, 13, 16]), "agent-a") == [10, 11, 12, 14, 15, 16]
    assert broker["rereads"] == [(12, 15)]
    assert app.consumer.gaps == [(12, 14)]  # done only once re-read and processed
    assert fg.GAP_RECOVERED.labels("agent-a", T, "0")._value.get() - before == 2


def test_first_record_beyond_the_committed_offset(broker: dict[str, Any]) -> None:
    broker["records"] = {5, 6, 7, 8}
    app = App(committed=5)
    assert run(Stream(app, [8, 9]), "agent-b") == [5, 6, 7, 8, 9]
    assert app.consumer.gaps == [(5, 7)]


def test_marker_only_jump_hands_over_nothing(broker: dict[str, Any]) -> None:
    broker["records"] = {0, 2, 4}  # 1 and 3: commit markers of config transactions
    app = App(committed=None)
    fg._for_app(app)._baselines[TP0] = 0  # the broker's committed offset (no broker here)
    assert run(Stream(app, [0, 2, 4]), "agent-c") == [0, 2, 4]
    assert broker["rereads"] == [(1, 2), (3, 4)]
    assert app.consumer.gaps == [(1, 1), (3, 3)]


def test_disabled_guard_passes_faust_through(broker: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fg, "_ENABLED", False)
    app = App(committed=10)
    assert run(Stream(app, [10, 15, 13]), "agent-d") == [10, 15, 13]
    assert broker["rereads"] == [] and app.consumer.gaps == []


def test_faust_gap_logic_is_off_for_guarded_topics_only(broker: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from faust.transport.consumer import Consumer as FaustConsumer

    calls: list[str] = []

    async def original(consumer: Any, tp: TP, a: int, b: int) -> None:
        calls.append(tp.topic)

    monkeypatch.setattr(FaustConsumer, "_add_gap", original)
    monkeypatch.setattr(fg, "_ORIGINAL_ADD_GAP", None)
    fg.install()
    assert FaustConsumer._add_gap is fg._unguarded_add_gap
    run(Stream(App(committed=0), [0]), "agent-e")  # registers the topic as guarded
    asyncio.run(FaustConsumer._add_gap(None, TP0, 1, 2))
    asyncio.run(FaustConsumer._add_gap(None, TP("postbus.events", 0), 1, 2))
    assert calls == ["postbus.events"]
