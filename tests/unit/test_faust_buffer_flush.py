"""Faust's producer buffer flush drains the buffer (services/common/faust_support.py
``drain_flush``): Faust's own gives up after 0.1 s without a record sent, and the consumer commits
offsets right after it, so under load a command's offset was committed before the table writes it
caused left the send-soon buffer (bench/chaos.py: accepted messages lost from the sender's table
after a crash)."""

from __future__ import annotations

import asyncio

from faust.transport.producer import ProducerBuffer

from services.common import faust_support


class SlowBuffer:
    """A send-soon buffer whose drain task sends one record every 0.25 s."""

    def __init__(self, records: int) -> None:
        self.size = records
        self.state = "running"
        self.message_sent = asyncio.Event()

    async def drain(self) -> None:
        while self.size:
            await asyncio.sleep(0.25)
            self.size -= 1
            self.message_sent.set()


def test_flush_returns_only_once_the_buffer_is_empty() -> None:
    async def run() -> tuple[int, int]:
        faust_way = SlowBuffer(4)
        drainer = asyncio.ensure_future(faust_way.drain())
        await ProducerBuffer.flush_atmost(faust_way, None)  # type: ignore[arg-type]  # Faust's flush
        left_by_faust = faust_way.size
        drainer.cancel()
        ours = SlowBuffer(4)
        drainer = asyncio.ensure_future(ours.drain())
        await asyncio.wait_for(faust_support.drain_flush(ours), 5)
        drainer.cancel()
        return left_by_faust, ours.size

    left_by_faust, left = asyncio.run(run())
    assert left_by_faust > 0  # control: Faust's flush returns with records still buffered
    assert left == 0


def test_make_app_installs_it() -> None:
    faust_support.install_buffer_flush()
    assert ProducerBuffer.flush is faust_support._patched_flush
