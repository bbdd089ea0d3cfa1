"""One key's records on the sender's ``messages`` changelog stay in the order they were written
(services/sender/message_store.py ``MessageStore``): recovery keeps the last record of a key.

Found by bench/chaos.py: the ``pending`` record of an accepted message goes through Faust's
send-soon buffer (in-stream table write), its ``sent`` state straight to the producer (the group
commit's ``write_table``); under load the buffer lags seconds, the ``pending`` record landed after
``sent`` (read on the changelog: offset 120 ``sent``, offset 177 ``pending``), and every sender
restart sent such messages again (161 of 2,000 with no other kill). Now a direct write of a key
waits until the key's buffered record is on the broker.

The sender's Faust app is built at import, so this runs in a fresh interpreter (dev settings, its
own state folder) with the broker replaced: buffered records are acknowledged when the test says."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import asyncio
    import services.sender.service as svc

    produced = []   # what reached the producer directly, in order
    buffered = {}   # key -> the future of its record in the send-soon buffer

    async def hand_over_many(app, topic, records):
        produced.extend(records)
        acks = asyncio.get_running_loop().create_future()
        acks.set_result(None)
        return acks

    def send_changelog(partition, key, value, key_serializer=None, value_serializer=None):
        fut = asyncio.get_running_loop().create_future()
        buffered[key] = fut
        return fut

    svc.hand_over_many = hand_over_many
    table = svc.message_store.table
    table.send_changelog = send_changelog
    table.partition_for_key = lambda key: 3   # the current command's partition

    async def main():
        store = svc.message_store
        store.set("t\\x1fm1", {"s": "pending", "p": 3})          # accepted: record buffered
        assert store.get("t\\x1fm1") == {"s": "pending", "p": 3}
        # positive control: a key with no buffered record is written at once
        await asyncio.wait_for(svc.write_table([(3, "t\\x1fm0", {"s": "sent", "p": 3})]), 2)
        assert len(produced) == 1
        # the outcome of m1 waits for m1's buffered pending record ...
        write = asyncio.ensure_future(svc.write_table([(3, "t\\x1fm1", {"s": "sent", "p": 3})]))
        await asyncio.sleep(0.3)
        assert not write.done() and len(produced) == 1, produced
        buffered["t\\x1fm1"].set_result(None)                    # ... until it is on the broker
        await asyncio.wait_for(write, 2)
        assert len(produced) == 2
        # a delete is buffered the same way
        store.delete("t\\x1fm1")
        assert store.get("t\\x1fm1") is None
        store.set_local("t\\x1fm1", {"s": "pending", "p": 3})
        put = asyncio.ensure_future(svc.write_table([(3, "t\\x1fm1", {"s": "pending", "p": 3})]))
        await asyncio.sleep(0.3)
        assert not put.done()
        put.cancel()
        # a buffered record whose send failed is never resolved by Faust: the outcome goes on after
        # SETTLE_TIMEOUT_S instead of stalling the group commit
        import services.sender.message_store as ms
        ms.SETTLE_TIMEOUT_S = 0.2
        store.set("t\x1fm2", {"s": "pending", "p": 3})
        await asyncio.wait_for(svc.write_table([(3, "t\x1fm2", {"s": "sent", "p": 3})]), 2)
        assert produced[-1][1] is not None and len(produced) == 3
        print("OK")

    asyncio.run(main())
""")


def test_a_direct_write_waits_for_the_keys_buffered_record(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")}
    env.update(POSTBUS_DEV="1", POSTBUS_STATE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-2000:] + res.stderr[-4000:]
