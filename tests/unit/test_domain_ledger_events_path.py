"""The outbound ledger counts ``sent`` events without waiting for the broker per event
(services/sender/domain_ledger.py ``_write_nowait``): bench/chaos.py found it waiting two broker
round trips per event, a few dozen events a second, minutes behind the sends under load.

The sender's Faust app is built at import, so the check runs in a fresh interpreter (dev settings,
its own state folder), with the ledger's topics replaced by ones whose broker never answers until
the test says so: the event must be counted at once; its mark reaches the marks changelog, carrying
the status snapshot's offset, only once that snapshot is acknowledged; Faust's commit (which flushes
the producer first) is what keeps an event's offset from being committed before its writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import asyncio, time
    from types import SimpleNamespace
    import services.sender.domain_ledger as dl
    from services.common import domain_quota as q

    sent = []          # (topic, key) handed to the producer
    acks = {}          # status snapshot futures, resolved by the test

    def fake(topic_name):
        async def send(key=None, value=None, **kw):
            fut = asyncio.get_running_loop().create_future()
            sent.append((topic_name, key))
            if topic_name == "status":
                acks[len(acks)] = fut
            else:
                fut.set_result(SimpleNamespace(offset=0))
            return fut
        return send

    dl.ledger.changelog_topic.send = fake("ledger")
    dl.status_topic.send = fake("status")
    dl.billing_topic.send = fake("billing")
    dl.marks.changelog_topic.send = fake("marks")

    async def main():
        now = q.now_ms()
        dl.ledger.data["shop.example"] = q.new_entry("shop.example", "t1", 0, now)
        writer = asyncio.ensure_future(dl._mark_writer())
        for i, mid in enumerate(("m1", "m2", "m1")):   # m1 resent after a crash: one message
            ev = {"type": "sent", "tenant_id": "t1", "message_id": mid, "ts": now + i}
            # with no broker answering, the old code waited here forever
            await asyncio.wait_for(dl._apply_event("shop.example", ev, 0, 10 + i), 2.0)
        entry = dl.ledger.data["shop.example"]
        assert (entry["today"], entry["msent"], entry["eoff"]) == (2, 2, 12), entry
        # each mark goes out with its entry (flushed before the events' offsets are committed) ...
        assert [t for t, _ in sent].count("marks") == 3, sent
        mark = dl.marks.data[q.mark_key("t1", "shop.example", q.MARK_MESSAGE, "m1")]
        assert mark["so"] == -1
        for n, fut in acks.items():
            fut.set_result(SimpleNamespace(offset=100 + n))
        for _ in range(100):
            if [t for t, _ in sent].count("marks") >= 6:
                break
            await asyncio.sleep(0.01)
        # ... and again with the offset of its status snapshot once that is acknowledged
        assert [t for t, _ in sent].count("marks") == 6, sent
        assert mark["so"] == 102, mark   # the snapshot of the resend's (uncounted) event
        # a crash lost m2's mark but not the entry that counted it: the event re-read restores the
        # mark (nothing counted), so a resend of m2 is not counted again
        del dl.marks.data[q.mark_key("t1", "shop.example", q.MARK_MESSAGE, "m2")]
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m2", "ts": now + 1}, 0, 11), 2.0)
        assert q.mark_key("t1", "shop.example", q.MARK_MESSAGE, "m2") in dl.marks.data
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m2", "ts": now + 9}, 0, 13), 2.0)
        assert dl.ledger.data["shop.example"]["today"] == 2
        # a re-read of an applied event (restart) counts nothing
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m3", "ts": now}, 0, 12), 2.0)
        assert dl.ledger.data["shop.example"]["today"] == 2
        # the other crash order (bench/chaos.py, a broker or sender kill: the ledger one short): the
        # mark of an event that counted reached the marks changelog, the entry with its count did not
        # (the recovered entry's eoff is before the event). Re-read, the event counts again ...
        entry_before = dict(dl.ledger.data["shop.example"])
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m4", "ts": now + 10}, 0, 14), 2.0)
        m4 = dict(dl.marks.data[q.mark_key("t1", "shop.example", q.MARK_MESSAGE, "m4")])
        assert m4["eo"] == [0, 14] and dl.ledger.data["shop.example"]["today"] == 3  # positive control
        dl.ledger.data["shop.example"] = entry_before  # the entry as recovered: without m4's count
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m4", "ts": now + 10}, 0, 14), 2.0)
        assert dl.ledger.data["shop.example"]["today"] == 3, dl.ledger.data["shop.example"]
        # ... while a resend of m4 (another event, same message) still counts nothing
        await asyncio.wait_for(dl._apply_event("shop.example", {"type": "sent", "tenant_id": "t1",
                                                                "message_id": "m4", "ts": now + 11}, 0, 15), 2.0)
        assert dl.ledger.data["shop.example"]["today"] == 3
        writer.cancel()
        print("OK")

    asyncio.run(main())
""")


def test_sent_events_are_counted_without_waiting_for_the_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")}
    env.update(POSTBUS_DEV="1", POSTBUS_STATE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-2000:] + res.stderr[-4000:]
