"""Rate-limit windows, destination sites and throttling, partition ownership (pure logic)."""

from __future__ import annotations

import asyncio

from services.sender.rate_windows import evaluate
from services.sender.scheduler import Ownership
from services.sender.throttle import SiteLimits, Throttle, limits_for, reserved, site_of_mx

MIN = 60_000
T0 = 1_700_000_040_000  # 2023-11-14 22:14:00 UTC, a minute boundary


def test_minute_window_counts_then_defers_to_the_next_boundary() -> None:
    state = None
    for i in range(3):
        state, until = evaluate(state, {"m": 3}, T0 + 1000 * i, MIN)
        assert until is None and state is not None
    assert state == {"m": [T0, 3]}
    blocked, until = evaluate(state, {"m": 3}, T0 + 59_999, MIN)
    assert blocked is None and until == T0 + MIN
    # the next window starts from zero
    state, until = evaluate(state, {"m": 3}, T0 + MIN, MIN)
    assert until is None and state == {"m": [T0 + MIN, 1]}


def test_windows_are_aligned_to_wall_clock_utc() -> None:
    hour = 60 * MIN
    day = 1440 * MIN
    now = T0 + 17 * MIN + 5_000
    state, _ = evaluate(None, {"m": 10, "h": 100, "d": 1000}, now, MIN)
    assert state == {"m": [T0 + 17 * MIN, 1], "h": [now - now % hour, 1], "d": [now - now % day, 1]}
    assert (now - now % day) % 86_400_000 == 0  # midnight UTC


def test_the_latest_full_window_decides_the_deferral() -> None:
    now = T0 + 30_000
    hour_start = now - now % (60 * MIN)
    state = {"m": [T0, 5], "h": [hour_start, 50]}
    _, until = evaluate(state, {"m": 5, "h": 50}, now, MIN)
    assert until == hour_start + 60 * MIN
    _, until = evaluate(state, {"m": 5, "h": 60}, now, MIN)
    assert until == T0 + MIN


def test_no_limit_counts_nothing() -> None:
    assert evaluate({"m": [T0, 99]}, {"m": None, "h": 0, "d": None}, T0, MIN) == (None, None)


def test_testing_window_scale() -> None:
    ten_s = 10_000
    state, _ = evaluate(None, {"m": 1}, T0 + 3_000, ten_s)
    _, until = evaluate(state, {"m": 1}, T0 + 4_000, ten_s)
    assert until == T0 + ten_s


def test_site_groups_domains_sharing_mx_hosts() -> None:
    gmail = site_of_mx([(5, "gmail-smtp-in.l.google.com."), (10, "alt1.gmail-smtp-in.l.google.com.")])
    workspace = site_of_mx([(1, "ASPMX.L.GOOGLE.COM."), (5, "alt1.aspmx.l.google.com.")])
    assert gmail == workspace == "l.google.com"
    assert site_of_mx([(0, "acme-com.mail.protection.outlook.com.")]) == "mail.protection.outlook.com"
    assert site_of_mx([(10, "mx.example.org.")]) == "example.org"
    assert site_of_mx([]) is None


def test_site_limits_defaults_providers_overrides_and_reserved_names() -> None:
    default = SiteLimits(600, 20)
    assert limits_for("example.org", {"example.org"}, {}, default) == default
    big = limits_for("l.google.com", {"gmail.com"}, {}, default)
    assert big.per_minute > default.per_minute and big.connections > default.connections
    assert limits_for("l.google.com", {"gmail.com"}, {"google.com": {"per_minute": 5}}, default).per_minute == 5
    assert reserved("example.test") and reserved("localhost") and not reserved("example.com")
    assert limits_for("example.test", {"example.test"}, {}, default) == SiteLimits(0, 0)
    assert limits_for("slow.test", {"slow.test"}, {"slow.test": {"per_minute": 3}}, default) == SiteLimits(3, 20)


def test_throttle_per_minute_and_connections() -> None:
    t = Throttle(SiteLimits(2, 0), {}, MIN)
    sites = {"example.org": {"example.org"}}
    assert t.acquire("k1", sites, T0) is None
    assert t.acquire("k2", sites, T0 + 1) is None
    assert t.acquire("k3", sites, T0 + 2) == T0 + MIN
    assert t.acquire("k3", sites, T0 + MIN) is None  # next minute
    c = Throttle(SiteLimits(0, 1), {}, MIN)
    assert c.acquire("a", sites, T0) is None
    assert c.acquire("b", sites, T0) == T0 + 1000  # one transaction at a time: retry in a second
    c.release("a")
    assert c.acquire("b", sites, T0) is None


def test_throttle_counts_nothing_when_one_site_is_full() -> None:
    t = Throttle(SiteLimits(1, 0), {}, MIN)
    assert t.acquire("k1", {"a.org": {"a.org"}}, T0) is None
    assert t.acquire("k2", {"a.org": {"a.org"}, "b.org": {"b.org"}}, T0) == T0 + MIN
    assert t.acquire("k3", {"b.org": {"b.org"}}, T0) is None  # b.org was not counted for k2


def test_ownership_claim_and_revoke_waits_for_sends_in_flight() -> None:
    async def scenario() -> None:
        o = Ownership()
        assert o.claim("k0", 3)  # no assignment seen yet: a single instance owns everything
        o.release("k0")
        o.recovered({0, 1})
        assert o.claim("k1", 1) and not o.claim("k9", 5)
        task = asyncio.ensure_future(o.revoke({1}, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not task.done() and not o.claim("k2", 1)
        o.release("k1")
        assert await asyncio.wait_for(task, 1) == 0
        assert o.claim("k3", 0)
        assert await o.revoke({0}, timeout_s=0.05) == 1  # gave up waiting, reports what is left

    asyncio.run(scenario())
