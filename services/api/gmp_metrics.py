"""The mail-proxy seed's Prometheus series on the API's public ``/metrics``:
``gmp_sent_total``, ``gmp_errors_total``, ``gmp_deferred_total``, ``gmp_rate_limited_total``
(labels tenant_id, account_id; present at zero for every configured account) and
``gmp_pending_messages``. Values come from the metrics service (ClickHouse over the event log), so
they are the same whichever API instance is scraped and however many senders run.

The route is public (the seed's contract) unless ``metrics_require_admin`` is set. The values come
from a snapshot at most ``api_metrics_snapshot_s`` old: a scrape flood costs at most one metrics
service query (one ClickHouse query) per interval, and concurrent scrapes of a stale snapshot wait
for one shared refresh. ``postbus_api_delivery_counters_refreshes_total`` counts the refreshes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from services.api.auth import authenticate, require_admin
from services.api.state import ApiState

log = logging.getLogger("postbus.api.gmp")

COUNTERS = (
    ("gmp_sent_total", "sent", "Total successfully sent emails"),
    ("gmp_errors_total", "errors", "Total permanent send failures"),
    ("gmp_deferred_total", "deferred", "Total temporarily deferred messages"),
    ("gmp_rate_limited_total", "rate_limited", "Total rate limit enforcement events"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(counters: dict[str, Any] | None, accounts: list[dict[str, Any]]) -> str:
    rows: dict[tuple[str, str], dict[str, int]] = {(a["tenant_id"], a["id"]): {} for a in accounts}
    for row in (counters or {}).get("accounts", []):
        rows[(row["tenant_id"], row["account_id"])] = row
    lines: list[str] = []
    for name, key, help_text in COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for (tenant_id, account_id), row in sorted(rows.items()):
            lines.append(f'{name}{{tenant_id="{_label(tenant_id)}",account_id="{_label(account_id)}"}} '
                         f"{float(row.get(key, 0))}")
    lines += ["# HELP gmp_pending_messages Current queue depth", "# TYPE gmp_pending_messages gauge",
              f"gmp_pending_messages {float((counters or {}).get('pending', 0))}"]
    lines += ["# HELP postbus_api_delivery_counters_up 1 when the gmp_* values could be read",
              "# TYPE postbus_api_delivery_counters_up gauge",
              f"postbus_api_delivery_counters_up {1.0 if counters is not None else 0.0}"]
    return "\n".join(lines) + "\n"


Counters = dict[str, Any] | None


class CountersSnapshot:
    """The last counters read (or None when the read failed: a failure is cached for the same
    interval, so a flood against a down metrics service costs nothing either)."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self.refreshes = 0
        self._value: Counters = None
        self._at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._at is not None and self.clock() - self._at < self.max_age_s

    async def get(self, fetch: Callable[[], Awaitable[Counters]]) -> Counters:
        if self._fresh():
            return self._value
        async with self._lock:  # one refresh at a time; the scrapes that waited reuse its result
            if not self._fresh():
                self.refreshes += 1
                self._value = await fetch()
                self._at = self.clock()
            return self._value

    def age_s(self) -> float:
        return 0.0 if self._at is None else max(0.0, self.clock() - self._at)


async def _fetch(st: ApiState) -> Counters:
    try:
        r = await st.metrics.get("/internal/counters", timeout=5.0)
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        log.warning("delivery counters unavailable", extra={"status": r.status_code})
    except Exception as exc:
        log.warning("delivery counters unavailable", extra={"error": str(exc)})
    return None


def snapshot_of(st: ApiState) -> CountersSnapshot:
    if st.gmp_snapshot is None:
        st.gmp_snapshot = CountersSnapshot(st.settings.api_metrics_snapshot_s)
    return st.gmp_snapshot  # type: ignore[no-any-return]


def check_access(request: Request, st: ApiState) -> None:
    """Public unless the operator set POSTBUS_METRICS_REQUIRE_ADMIN (then: admin token only;
    no token 401, a tenant key 403 admin_required)."""
    if st.settings.metrics_require_admin:
        require_admin(authenticate(request, st))


async def gmp_text(st: ApiState) -> str:
    snap = snapshot_of(st)
    counters = await snap.get(lambda: _fetch(st))
    return render(counters, list(st.accounts.items.values())) + "\n".join((
        "# HELP postbus_api_delivery_counters_refreshes_total reads of the delivery counters by this API process",
        "# TYPE postbus_api_delivery_counters_refreshes_total counter",
        f"postbus_api_delivery_counters_refreshes_total {float(snap.refreshes)}",
        "# HELP postbus_api_delivery_counters_age_seconds age of the delivery counters snapshot",
        "# TYPE postbus_api_delivery_counters_age_seconds gauge",
        f"postbus_api_delivery_counters_age_seconds {snap.age_s():.3f}",
    )) + "\n"
