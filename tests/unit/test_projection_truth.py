"""Message projection rules that keep the listing truthful when commands and the sender race
(embedded ClickHouse), and the ingest's read-your-writes wait (no broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.metrics import messages as mp
from services.metrics.ingest import Ingestor
from services.metrics.store import Store, event_row

NOW = int(time.time() * 1000)
S = 1000


def msg(mid: str, pk: str, **kw: Any) -> dict[str, Any]:
    base = {"id": mid, "pk": pk, "tenant_id": "t-a", "account_id": "acc", "from_addr": "a@x.test",
            "to": ["b@y.test"], "subject": f"S {mid}", "priority": 2, "deferred_ts": None, "batch_code": None,
            "accepted_ts": NOW - 100 * S}
    return {**base, **kw}


def add(store: Store, offset: int, *messages: dict[str, Any]) -> None:
    store.insert_rows("messages", mp.message_rows({"messages": list(messages)}, offset), mp.MESSAGE_COLUMNS)


def ev(store: Store, event_id: str, type_: str, mid: str, pk: str, ts: int) -> None:
    store.insert_events([event_row({"event_id": event_id, "type": type_, "tenant_id": "t-a", "message_id": mid,
                                    "pk": pk, "ts": ts})])


def mark(store: Store, ids: list[str], kind: str, offset: int, ts: int = NOW) -> None:
    store.insert_rows("message_marks", mp.mark_rows("t-a", ids, kind, offset, ts), mp.MARK_COLUMNS)


def listed(store: Store) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in mp.list_messages(store, "t-a")["messages"]}


def test_resubmission_of_a_sent_id_shows_the_send_never_pending(store: Store) -> None:
    """A sent id queued again before the API could see the send: the sender ignores it (already
    sent); the listing shows the original send, not a pending message that never goes out."""
    add(store, 1, msg("m1", "pk-1", subject="v1"))
    ev(store, "e1", "sent", "m1", "pk-1", NOW - 10 * S)
    add(store, 2, msg("m1", "pk-2", subject="v2"))
    got = listed(store)["m1"]
    assert (got["status"], got["pk"], got["sent_ts"]) == ("sent", "pk-1", (NOW - 10 * S) / 1000)
    assert mp.lookup(store, "t-a", ["m1"]) == {"pending": [], "final": ["m1"], "other_tenants": []}
    # control: an id whose earlier submission was not sent (an error) is pending again when re-queued
    add(store, 3, msg("m2", "pk-a"))
    ev(store, "e2", "error", "m2", "pk-a", NOW - 9 * S)
    add(store, 4, msg("m2", "pk-b"))
    assert (listed(store)["m2"]["status"], listed(store)["m2"]["pk"]) == ("pending", "pk-b")


def test_a_send_before_a_tenant_deletion_does_not_count(store: Store) -> None:
    add(store, 1, msg("m1", "pk-1"))
    ev(store, "e1", "sent", "m1", "pk-1", NOW - 10 * S)
    mark(store, [""], "tenant_deleted", 2, NOW - 5 * S)
    assert listed(store) == {}
    add(store, 3, msg("m1", "pk-2"))  # the sender forgot the deleted tenant's ids: this one is sent again
    assert (listed(store)["m1"]["status"], listed(store)["m1"]["pk"]) == ("pending", "pk-2")


def test_delete_mark_hides_pending_but_not_what_the_sender_already_finished(store: Store) -> None:
    add(store, 1, msg("p", "pk-p"), msg("s", "pk-s"), msg("d", "pk-d"))
    ev(store, "e1", "deferred", "p", "pk-p", NOW - 9 * S)
    mark(store, ["p", "s", "d"], "deleted", 2)
    assert listed(store) == {}  # at once, before the sender acted on the delete
    ev(store, "e2", "sent", "s", "pk-s", NOW - 8 * S)  # it was in flight: sent, not deleted
    ev(store, "e3", "deleted", "d", "pk-d", NOW - 8 * S)
    got = listed(store)
    assert set(got) == {"s"} and got["s"]["status"] == "sent"
    # a cleanup mark hides final messages
    mark(store, ["s"], "cleaned", 3)
    assert listed(store) == {}


def test_ingest_wait_returns_when_positions_reach_the_targets() -> None:
    async def run() -> None:
        ing = Ingestor(store=None, bootstrap="unused:9092")  # type: ignore[arg-type]
        ing.positions = {("postbus.commands", 0): 5}
        assert await ing.wait_for({("postbus.commands", 0): 5}, 0.1) == "reached"
        assert await ing.wait_for({("postbus.commands", 3): 0}, 0.1) == "reached"  # nothing written there
        assert await ing.wait_for({("postbus.commands", 0): 6}, 0.05) == "timeout"

        async def advance() -> None:
            await asyncio.sleep(0.05)
            ing.positions[("postbus.commands", 0)] = 7
            ing._advanced()

        task = asyncio.create_task(advance())
        t0 = time.monotonic()
        assert await ing.wait_for({("postbus.commands", 0): 7}, 5.0) == "reached"
        assert time.monotonic() - t0 < 2.0
        await task
        ing.replaying = True
        assert await ing.wait_for({("postbus.commands", 0): 8}, 5.0) == "replaying"

    asyncio.run(run())
