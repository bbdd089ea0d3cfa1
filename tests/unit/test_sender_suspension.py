"""Suspension rules shared by the API (suspend/activate) and the sender (what is held)."""

from __future__ import annotations

import pytest

from services.common import suspension as s
from services.sender.scheduler import Scheduler


def test_suspend_all_holds_everything_including_unbatched() -> None:
    rec = s.suspend(None, "t", None, 10)
    assert rec == {"tenant_id": "t", "all": True, "batches": [], "updated_ts": 10}
    assert s.is_held(rec, None) and s.is_held(rec, "any")
    assert s.suspend(rec, "t", "*", 11)["all"] is True


def test_batch_suspension_holds_only_that_batch_and_is_idempotent() -> None:
    rec = s.suspend(None, "t", "b", 1)
    assert s.suspend(rec, "t", "b", 2)["batches"] == ["b"]
    assert s.is_held(rec, "b")
    assert not s.is_held(rec, "c") and not s.is_held(rec, None)
    assert not s.is_held(None, "b")


def test_activate_batch_while_all_suspended_is_refused_and_activate_all_clears() -> None:
    rec = s.suspend(s.suspend(None, "t", "b", 1), "t", None, 2)
    with pytest.raises(s.AllBatchesSuspended):
        s.activate(rec, "t", "b", 3)
    cleared = s.activate(rec, "t", None, 3)
    assert cleared["all"] is False and cleared["batches"] == []
    assert s.activate(cleared, "t", None, 4)["batches"] == []  # idempotent
    assert s.activate(s.suspend(None, "t", "b", 1), "t", "other", 2)["batches"] == ["b"]


def test_newer_keeps_the_latest_record() -> None:
    old, new = s.suspend(None, "t", None, 1), s.activate(None, "t", None, 2)
    assert s.newer(None, old) and s.newer(old, new) and not s.newer(new, old)


def test_dropped_lane_is_closed_and_forgotten() -> None:
    sched = Scheduler()
    assert sched.push("t/a", "k", 2, 1, None, 0) is True
    lane = sched.lane("t/a")
    assert sched.drop("t/a") is lane
    assert lane.closed and len(lane) == 0 and lane.wake.is_set()
    assert sched.push("t/a", "k2", 2, 2, None, 0) is True  # a new lane for a re-created account
    assert sched.drop("missing") is None
