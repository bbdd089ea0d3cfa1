"""Per-tenant sync state and the decision "call now, or sleep how long" (pure, unit-tested)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["events", "empty"]


@dataclass
class SyncState:
    last_sync_ts: float = 0.0  # unix time of the last acknowledged call (events or empty)
    dnd_until: float = 0.0  # next_sync_after: no calls *without events* before this
    retry_at: float = 0.0  # after a failed call: no call before this (backoff)
    failures: int = 0  # consecutive failed calls (drives the backoff)
    pending_since: float | None = None  # when the oldest pending report arrived (linger start)
    force: bool = False  # run-now: call at once (an empty call still respects DND)
    recall: bool = False  # the client answered queued > 0: call again at once
    last_outcome: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def in_dnd(self, now: float) -> bool:
        return now < self.dnd_until

    def next_sync_due(self, now: float, interval_s: float) -> bool:
        return now >= self.last_sync_ts + interval_s

    def status(self, now: float, interval_s: float) -> dict[str, object]:
        """The fields of GET /tenants/sync-status (seed: last_sync_ts is in the future under DND)."""
        return {
            "last_sync_ts": int(max(self.last_sync_ts, self.dnd_until)) or None,
            "next_sync_due": self.next_sync_due(now, interval_s) and not self.in_dnd(now),
            "in_dnd": self.in_dnd(now),
            "dnd_until": self.dnd_until or None,
            "retry_at": self.retry_at if self.retry_at > now else None,
            "failures": self.failures,
            "last_outcome": self.last_outcome,
        }


def next_action(
    st: SyncState,
    now: float,
    *,
    pending: int,
    has_endpoint: bool,
    active: bool,
    batch_size: int,
    linger_s: float,
    interval_s: float,
) -> tuple[Action | None, float | None]:
    """Returns (action, 0) to call now, or (None, seconds to sleep) / (None, None) = until woken."""
    if not has_endpoint:
        return None, None  # unknown tenant or no client_base_url: keep events, wait for config
    if now < st.retry_at and not st.force:
        return None, st.retry_at - now
    if pending:
        # calls with events are not subject to DND (PRODUCT.md: DND is for calls without events)
        if pending >= batch_size or st.force or st.recall:
            return "events", 0.0
        due = (st.pending_since if st.pending_since is not None else now) + linger_s
        return ("events", 0.0) if now >= due else (None, due - now)
    if st.recall:
        # queued > 0 is an explicit request for an immediate call; it wins over a standing
        # next_sync_after (clients that always return one would otherwise stall the fast loop)
        return "empty", 0.0
    if not active:
        return None, None  # no empty calls to an inactive tenant, forced or not
    if st.in_dnd(now):
        return None, st.dnd_until - now
    if st.force:
        return "empty", 0.0
    due = st.last_sync_ts + interval_s
    return ("empty", 0.0) if now >= due else (None, due - now)
