"""The sender engine (services/sender/engine.py) without Kafka or SMTP: a dict for the table, a list
for the events, a fake SMTP connection, a settable clock. Accept, hold/release by suspension, retry
of a temporary failure, the final outcome and its order (event before table), and the group
commit's bounded window (services/sender/group_commit.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib

from services.sender import pipeline as pl
from services.sender.engine import Deps, Sender, table_key


class FakeStore:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.log = log

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def keys(self) -> list[str]:
        return list(self.data)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self.data.items())

    def set_local(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value

    def set(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def put(self, partition: int, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        self.log.append(("table", (key, value["s"], value.get("a"))))


class FakeConnection:
    def __init__(self, target: Any, script: list[BaseException | None]) -> None:
        self.target = target
        self.script = script
        self.sent: list[tuple[str, list[str], bytes]] = []

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        self.sent.append((sender, recipients, data))

    async def close(self) -> None:
        pass


class Harness:
    def __init__(self, script: list[BaseException | None] | None = None, per_worker: int = 4) -> None:
        self.clock = 1_000_000
        self.log: list[tuple[str, Any]] = []
        self.store = FakeStore(self.log)
        self.events: list[dict[str, Any]] = []
        self.conns: list[FakeConnection] = []
        self.script = script or []
        self.checked: list[str] = []
        self.durable = asyncio.Event()  # cleared: the broker does not answer
        self.durable.set()
        self.table_durable = asyncio.Event()  # cleared: the changelog does not answer
        self.table_durable.set()
        self.table: dict[str, dict[str, Any]] = {}  # what the changelog has
        self._landing: set[asyncio.Future[Any]] = set()

        async def write_events(events: list[tuple[str, dict[str, Any]]]) -> None:
            await self.durable.wait()
            for _, e in events:
                self.events.append(e)
                self.log.append(("event", (e["message_id"], e["type"])))

        async def write_table(records: list[tuple[int, str, dict[str, Any]]]) -> None:
            await self.table_durable.wait()
            for _, key, value in records:
                self.table[key] = value
                self.log.append(("table", (key, value["s"], value.get("a"))))

        async def append_table(records: list[tuple[int, str, dict[str, Any]]]) -> asyncio.Future[Any]:
            acks: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            async def land() -> None:
                await write_table(records)
                acks.set_result(None)

            self._landing.add(asyncio.ensure_future(land()))
            return acks

        async def emit(tenant_id: str, events: list[dict[str, Any]]) -> None:
            for e in events:
                self.events.append(e)
                self.log.append(("event", (e["message_id"], e["type"])))

        async def check(ctx: pl.SendContext) -> pl.Decision | None:
            self.checked.append(ctx.key)
            return None

        async def build(ctx: pl.SendContext) -> bytes:
            return f"Subject: {ctx.message['subject']}\r\n\r\nbody\r\n".encode()

        async def ready() -> None:
            return None

        def connect(target: Any) -> FakeConnection:
            conn = FakeConnection(target, self.script)
            self.conns.append(conn)
            return conn

        self.sender = Sender(Deps(
            store=self.store, emit=emit, write_events=write_events, write_table=write_table, append_table=append_table,
            unflushed_per_worker=per_worker,
            account=lambda key: {"id": key, "max_connections": 1, "updated_ts": 1},
            tenant=lambda tid: {"id": tid, "active": True},
            instance=lambda: None,
            pipeline=pl.Pipeline(checks=[check], builder=build),
            target=lambda key, account: ("target", key),
            connect=connect, ready=ready, clock=lambda: self.clock,
            retry_base_s=1.0, retry_max_delay_s=10.0, max_attempts=3, retry_max_age_s=3600.0,
            error_pause_s=0.01,
        ))

    def message(self, mid: str, **kw: Any) -> dict[str, Any]:
        return {"id": mid, "tenant_id": "t1", "account_id": "a1", "pk": f"pk-{mid}", "priority": 2,
                "from_addr": "Sender <s@example.com>", "to": [f"{mid}@example.org"], "cc": [], "bcc": [],
                "subject": f"hello {mid}", "accepted_ts": self.clock, "deferred_ts": None, "batch_code": None,
                **kw}

    def types(self, mid: str) -> list[str]:
        return [e["type"] for e in self.events if e["message_id"] == mid]

    async def until(self, cond: Any, limit_s: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not cond():
            assert loop.time() < deadline, "condition not reached in time"
            await asyncio.sleep(0.005)


async def test_accept_sends_then_writes_event_before_table() -> None:
    h = Harness()
    await h.sender.accept_all([h.message("m1")], 0, 1)
    key = table_key("t1", "m1")
    assert h.store.get(key)["s"] == "pending"
    await h.until(lambda: h.table.get(key, {}).get("s") == "sent")
    assert h.types("m1") == ["sent"]
    assert [e["smtp_code"] for e in h.events if e["message_id"] == "m1"] == [250]  # the end-of-data reply
    # the pending record is on the changelog before the message is even scheduled; then the event
    # is durable before the final state
    assert h.log == [("table", (key, "pending", 0)), ("event", ("m1", "sent")), ("table", (key, "sent", None))]
    assert h.conns[0].sent[0][1] == ["m1@example.org"]
    assert h.checked == [key]
    # the same submission again (re-read after a restart): ignored, nothing sent twice
    await h.sender.accept_all([h.message("m1")], 0, 1)
    await asyncio.sleep(0.05)
    assert len(h.conns[0].sent) == 1 and h.types("m1") == ["sent"]
    await h.sender.stop()


async def test_suspended_batch_is_held_then_released() -> None:
    h = Harness()
    await h.sender.suspension_changed({}, {"tenant_id": "t1", "all": False, "batches": ["b1"], "updated_ts": 1})
    await h.sender.accept_all([h.message("m1", batch_code="b1")], 0, 1)
    await h.sender.accept_all([h.message("m2", batch_code="b2")], 0, 2)
    key1 = table_key("t1", "m1")
    await h.until(lambda: h.types("m2") == ["sent"])
    await h.until(lambda: key1 in h.sender.held.get("t1", set()))
    assert h.types("m1") == [] and h.sender.pending() == 1
    # the batch activated: the held message goes back to its lane and is sent
    await h.sender.suspension_changed({}, {"tenant_id": "t1", "all": False, "batches": [], "updated_ts": 2})
    await h.until(lambda: h.types("m1") == ["sent"])
    assert h.sender.held == {}
    await h.sender.stop()


async def test_temporary_failure_is_retried_then_sent() -> None:
    refused = aiosmtplib.SMTPResponseException(451, "4.7.1 try later")
    h = Harness(script=[refused])
    await h.sender.accept_all([h.message("m1")], 0, 1)
    key = table_key("t1", "m1")
    await h.until(lambda: h.types("m1") == ["deferred"])
    value = h.store.get(key)
    assert value["s"] == "pending" and value["a"] == 1 and value["due"] > h.clock
    h.clock = value["due"] + 1  # the retry is due
    h.sender.scheduler.lane("t1/a1").wake.set()
    await h.until(lambda: h.types("m1") == ["deferred", "sent"])
    assert h.store.get(key)["s"] == "sent"
    assert [e["attempt"] for e in h.events] == [1, 2]
    await h.sender.stop()


async def test_permanent_failure_and_last_attempt_end_in_error() -> None:
    h = Harness(script=[aiosmtplib.SMTPResponseException(550, "5.1.1 no such user")])
    await h.sender.accept_all([h.message("m1")], 0, 1)
    await h.until(lambda: h.types("m1") == ["error"])
    assert h.store.get(table_key("t1", "m1"))["s"] == "error"
    await h.sender.stop()


async def test_delete_and_cleanup_and_rebuild() -> None:
    h = Harness()
    await h.sender.suspension_changed({}, {"tenant_id": "t1", "all": True, "batches": [], "updated_ts": 1})
    await h.sender.accept_all([h.message("m1")], 0, 1)
    await h.sender.accept_all([h.message("m2")], 0, 2)
    assert h.sender.rebuild() == 2  # the schedule again from the table's pending entries
    await h.sender.delete({}, {"tenant_id": "t1", "ids": ["m1"]})
    assert h.types("m1") == ["deleted"] and h.store.get(table_key("t1", "m1")) is None
    h.store.set(table_key("t1", "m3"), {"s": "sent", "p": 0, "ts": 1})
    await h.sender.cleanup({}, {"tenant_id": "t1", "ids": ["m3"]})
    assert h.store.get(table_key("t1", "m3")) == {"s": "sent"}
    await h.sender.stop()


async def test_a_message_is_sent_only_once_its_pending_record_is_on_the_changelog() -> None:
    h = Harness()
    await h.sender.accept_all([h.message("m0")], 0, 1)  # control: accepted, then sent
    await h.until(lambda: h.types("m0") == ["sent"])
    h.table_durable.clear()
    await h.sender.accept_all([h.message("m1")], 0, 2)  # handed over: returns without waiting for acks
    assert h.store.get(table_key("t1", "m1"))["s"] == "pending"
    # not sendable before the record is acknowledged: in the table, in no lane (m0 was, and went)
    assert h.sender.pending() == 0 and h.types("m1") == [] and len(h.conns[0].sent) == 1
    h.table_durable.set()
    await h.until(lambda: h.types("m1") == ["sent"])
    assert h.log.index(("table", (table_key("t1", "m1"), "pending", 0))) < h.log.index(("event", ("m1", "sent")))
    await h.sender.stop()


async def test_group_commit_window_bounds_what_is_not_durable() -> None:
    """The broker stops answering: a worker hands over at most ``per_worker`` outcomes and sends no
    more; nothing reaches the changelog before its event; all of it is written once it answers."""
    h = Harness(per_worker=2)
    h.durable.clear()
    for i in range(6):
        await h.sender.accept_all([h.message(f"m{i}")], 0, i)
    await h.until(lambda: h.sender.commit.unsettled == 2)
    await asyncio.sleep(0.05)
    # two outcomes waiting for the broker, the third message sent and waiting for a slot: no more
    assert len(h.conns[0].sent) == 3 and h.sender.commit.unsettled == 2
    assert h.events == [] and {v["s"] for v in h.table.values()} == {"pending"}  # accepted, no final state
    h.durable.set()
    await h.until(lambda: [v["s"] for v in h.table.values()] == ["sent"] * 6)
    assert sorted(e["message_id"] for e in h.events) == [f"m{i}" for i in range(6)]
    for i in range(6):  # per message: its event before its table record
        key = table_key("t1", f"m{i}")
        assert h.log.index(("event", (f"m{i}", "sent"))) < h.log.index(("table", (key, "sent", None)))
    await h.sender.commit.flush()
    assert h.sender.commit.unsettled == 0
    await h.sender.stop()


async def test_a_replacement_waits_for_the_outcome_it_follows() -> None:
    """A message re-added (new submission) while its previous attempt's outcome is not yet durable:
    the replacement is written after that outcome, so a recovery never restores the older value."""
    h = Harness(script=[aiosmtplib.SMTPResponseException(451, "4.7.1 later")])
    h.durable.clear()
    await h.sender.accept_all([h.message("m1")], 0, 1)
    key = table_key("t1", "m1")
    await h.until(lambda: key in h.sender.commit.keys)
    replaced = asyncio.ensure_future(h.sender.accept_all([h.message("m1", pk="pk-new")], 0, 2))
    await asyncio.sleep(0.05)
    assert not replaced.done() and h.store.get(key)["m"]["pk"] == "pk-m1"
    h.durable.set()
    await replaced
    assert ("table", (key, "pending", 1)) in h.log  # the deferral reached the changelog first
    await h.until(lambda: h.types("m1") == ["deferred", "sent"])
    assert h.events[-1]["pk"] == "pk-new"
    await h.sender.stop()
