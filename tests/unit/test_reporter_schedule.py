"""When the per-tenant flusher calls the client: events, idle calls, DND, backoff, run-now."""

from __future__ import annotations

from services.reporter.schedule import SyncState, next_action

NOW = 1_800_000_000.0
KW = {"has_endpoint": True, "active": True, "batch_size": 100, "linger_s": 0.2, "interval_s": 300.0}


def decide(st: SyncState, pending: int = 0, now: float = NOW, **kw: object) -> tuple[object, object]:
    args = {**KW, **kw}
    return next_action(st, now, pending=pending, **args)  # type: ignore[arg-type]


def test_no_endpoint_waits_for_config_and_keeps_events() -> None:
    assert decide(SyncState(), pending=5, has_endpoint=False) == (None, None)


def test_events_linger_then_go() -> None:
    st = SyncState(pending_since=NOW, last_sync_ts=NOW)
    action, delay = decide(st, pending=3)
    assert action is None and abs(delay - 0.2) < 1e-6  # type: ignore[operator]
    assert decide(st, pending=3, now=NOW + 0.25) == ("events", 0.0)


def test_full_batch_goes_at_once() -> None:
    st = SyncState(pending_since=NOW, last_sync_ts=NOW)
    assert decide(st, pending=100) == ("events", 0.0)


def test_events_ignore_dnd() -> None:
    st = SyncState(pending_since=NOW - 1, last_sync_ts=NOW, dnd_until=NOW + 3600)
    assert decide(st, pending=1) == ("events", 0.0)


def test_dnd_blocks_idle_calls() -> None:
    st = SyncState(last_sync_ts=NOW - 1000, dnd_until=NOW + 50)
    assert decide(st) == (None, 50.0)
    assert decide(st, now=NOW + 51) == ("empty", 0.0)


def test_idle_call_every_interval() -> None:
    st = SyncState(last_sync_ts=NOW - 100)
    assert decide(st) == (None, 200.0)
    assert decide(st, now=NOW + 200) == ("empty", 0.0)
    assert decide(SyncState()) == ("empty", 0.0)  # never synced: call now


def test_inactive_tenant_gets_no_idle_call_but_events_go() -> None:
    assert decide(SyncState(), active=False) == (None, None)
    assert decide(SyncState(pending_since=NOW - 1), pending=2, active=False) == ("events", 0.0)


def test_backoff_delays_everything_but_run_now() -> None:
    st = SyncState(pending_since=NOW - 10, retry_at=NOW + 8)
    assert decide(st, pending=500) == (None, 8.0)
    st.force = True
    assert decide(st, pending=500) == ("events", 0.0)


def test_queued_recall_is_immediate_even_in_dnd() -> None:
    st = SyncState(last_sync_ts=NOW, dnd_until=NOW + 600, recall=True)
    assert decide(st) == ("empty", 0.0)


def test_run_now_respects_dnd_for_empty_calls() -> None:
    st = SyncState(last_sync_ts=NOW, dnd_until=NOW + 600, force=True)
    assert decide(st) == (None, 600.0)
    st.dnd_until = 0.0  # what a tenant's run-now with override_dnd does
    assert decide(st) == ("empty", 0.0)


def test_status_fields() -> None:
    st = SyncState(last_sync_ts=NOW - 10, dnd_until=NOW + 100)
    s = st.status(NOW, 300.0)
    assert s["in_dnd"] is True and s["next_sync_due"] is False
    assert s["last_sync_ts"] == int(NOW + 100)  # the seed shows a future last_sync_ts under DND
    s = SyncState(last_sync_ts=NOW - 400).status(NOW, 300.0)
    assert s["in_dnd"] is False and s["next_sync_due"] is True and s["last_sync_ts"] == int(NOW - 400)
