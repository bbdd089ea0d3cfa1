"""Per-account (minute/hour/day) and per-tenant (hour/day) send limits, exact across restarts and
sender instances.

A pipeline check counts every attempt *before* its SMTP transaction, in the changelog-backed table
``rate_limits`` (key ``a/<tenant>/<account>`` or ``t/<tenant>``, written on the tenant's partition
and awaited on the broker). Windows are aligned to wall-clock boundaries (UTC): a full window defers
the message to the start of the next one (``rate_limit``) or fails it (``rate_limit_exceeded``)
when the account's ``limit_behavior`` is ``reject``. The instance that owns the tenant's partition
is the only one counting for it (see :class:`services.sender.scheduler.Ownership`), so no two
instances count the same window. A limit that is null, 0 or negative means no limit (as in genro-mail-proxy 0.6).

``sender_rate_minute_s`` (testing only) shrinks the "minute"; the hour and day scale with it."""

from __future__ import annotations

import logging
from typing import Any

from services.common.faust_support import table_put
from services.common.settings import Settings
from services.sender import pipeline
from services.sender.rate_windows import evaluate

log = logging.getLogger("postbus.sender.rate_limits")


def _limits(ctx: pipeline.SendContext) -> tuple[dict[str, int | None], dict[str, int | None]]:
    acc, tenant = ctx.account, ctx.tenant or {}
    return ({"m": acc.get("limit_per_minute"), "h": acc.get("limit_per_hour"), "d": acc.get("limit_per_day")},
            {"h": tenant.get("rate_limit_hourly"), "d": tenant.get("rate_limit_daily")})


class RateLimits:
    """The check over the ``rate_limits`` table (created in services/sender/app.py)."""

    def __init__(self, table: Any, settings: Settings) -> None:
        self.table = table
        self.minute_ms = int(settings.sender_rate_minute_s * 1000)

    async def check(self, ctx: pipeline.SendContext) -> pipeline.Decision | None:
        account_limits, tenant_limits = _limits(ctx)
        tid, aid = ctx.message["tenant_id"], ctx.message["account_id"]
        akey, tkey = f"a/{tid}/{aid}", f"t/{tid}"
        data = self.table.data
        # both scopes are decided before either is counted: a deferred message reserves nothing. No
        # await between reading and writing table.data, so concurrent workers see each other's counts.
        new_a, until_a = evaluate(data.get(akey), account_limits, ctx.now_ms, self.minute_ms)
        new_t, until_t = evaluate(data.get(tkey), tenant_limits, ctx.now_ms, self.minute_ms)
        untils = [u for u in (until_a, until_t) if u is not None]
        if untils:
            if ctx.account.get("limit_behavior") == "reject":
                return pipeline.Decision.reject("rate_limit_exceeded")
            return pipeline.Decision.defer("rate_limit", max(untils))
        writes = [(k, v) for k, v in ((akey, new_a), (tkey, new_t)) if v is not None]
        for key, value in writes:
            data[key] = value
        for key, value in writes:  # on the broker before the SMTP transaction starts
            await table_put(self.table, ctx.partition, key, value)
        return None
