"""The sender's attachment byte budget (services/sender/prepare_mime.py): reservations wait for room,
an oversized one runs alone, a reservation grows to the real size, and everything is released."""

from __future__ import annotations

import asyncio

from services.sender.prepare_mime import ByteBudget, estimate


async def _hold(budget: ByteBudget, n: int, started: asyncio.Event, release: asyncio.Event) -> None:
    async with budget.reserve(n):
        started.set()
        await release.wait()


def test_a_reservation_waits_until_the_bytes_fit_and_everything_is_released() -> None:
    async def run() -> None:
        budget = ByteBudget(100)
        a_in, a_out, b_in, b_out = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(_hold(budget, 70, a_in, a_out))
        await a_in.wait()
        b = asyncio.create_task(_hold(budget, 40, b_in, b_out))
        await asyncio.sleep(0.05)
        assert not b_in.is_set() and budget.used == 70  # 70 + 40 > 100: b waits
        a_out.set()
        await asyncio.wait_for(b_in.wait(), 1)
        assert budget.used == 40
        b_out.set()
        await asyncio.gather(a, b)
        assert budget.used == 0

    asyncio.run(run())


def test_an_estimate_over_the_capacity_runs_alone() -> None:
    async def run() -> None:
        budget = ByteBudget(100)
        small_in, small_out, big_in, big_out = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        small = asyncio.create_task(_hold(budget, 1, small_in, small_out))
        await small_in.wait()
        big = asyncio.create_task(_hold(budget, 10_000, big_in, big_out))
        await asyncio.sleep(0.05)
        assert not big_in.is_set()  # waits for an empty budget, never forever
        small_out.set()
        await asyncio.wait_for(big_in.wait(), 1)
        assert budget.used == 100
        big_out.set()
        await asyncio.gather(small, big)
        assert budget.used == 0

    asyncio.run(run())


def test_a_reservation_grows_to_the_real_size_and_holds_back_others() -> None:
    async def run() -> None:
        budget = ByteBudget(100)
        w_in, w_out = asyncio.Event(), asyncio.Event()
        async with budget.reserve(10) as held:
            held.grow_to(95)
            assert budget.used == 95
            waiter = asyncio.create_task(_hold(budget, 10, w_in, w_out))
            await asyncio.sleep(0.05)
            assert not w_in.is_set()
        await asyncio.wait_for(w_in.wait(), 1)
        assert budget.used == 10
        w_out.set()
        await waiter
        assert budget.used == 0

    asyncio.run(run())


def test_estimates() -> None:
    assert estimate({"fetch_mode": "base64", "storage_path": "base64:" + "A" * 400}, 5000) == 300
    assert estimate({"fetch_mode": "http_url", "storage_path": "https://x.test/a"}, 5000) == 5000
