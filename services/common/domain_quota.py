"""Outbound quota rules of a sending domain, shared by the ledger (sender) and the API (reads).

A ledger entry is a small JSON dict: the domain's limits as last applied from a ``domain.update``
command, its counters for the current UTC day and month, and ``off``, the offset of the last
command applied to it (commands of a domain always come through one partition, so a replayed
command is recognised and not counted twice)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

TIERS = ("shared", "dedicated")
STATUSES = ("active", "suspended")
ENFORCEMENTS = ("soft", "hard")


def period(ts_ms: int) -> tuple[str, str]:
    """(day, month) of a timestamp in UTC: ``YYYY-MM-DD``, ``YYYY-MM``."""
    d = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return d.strftime("%Y-%m-%d"), d.strftime("%Y-%m")


def now_ms() -> int:
    return int(time.time() * 1000)


def rate(count: int, sent: int) -> float:
    """A percentage of the month's sent mail; 0 when nothing was sent."""
    return round(count / sent * 100, 4) if sent > 0 else 0.0


def new_entry(name: str, tenant_id: str, partition: int, ts_ms: int) -> dict[str, Any]:
    day, month = period(ts_ms)
    return {"name": name, "tenant": tenant_id, "p": partition, "status": "active", "daily": 0, "monthly": 0,
            "enf": "soft", "day": day, "month": month, "today": 0, "msent": 0, "bounce": 0, "compl": 0,
            "off": -1, "res": [True, None]}


def frozen(entry: dict[str, Any], cause: str, ts_ms: int) -> dict[str, Any]:
    """The month's counters as a billing record (the seed's frozen entry plus month/cause)."""
    return {
        "name": entry["name"], "partner_ref": entry["tenant"], "month": entry["month"],
        "outbound_sent_month": entry["msent"], "outbound_monthly_limit": entry["monthly"],
        "bounce_count": entry["bounce"], "complaint_count": entry["compl"],
        "bounce_rate": rate(entry["bounce"], entry["msent"]), "complaint_rate": rate(entry["compl"], entry["msent"]),
        "frozen_ts": ts_ms, "cause": cause,
    }


def reset_month(entry: dict[str, Any], month: str) -> None:
    entry.update(msent=0, bounce=0, compl=0, month=month)


def roll(entry: dict[str, Any], ts_ms: int) -> dict[str, Any] | None:
    """Move the entry to the UTC day/month of ``ts_ms`` (idempotent). Returns the frozen billing
    record of the month that ended, if it had any activity."""
    day, month = period(ts_ms)
    out = None
    if month > entry["month"]:
        if entry["msent"] or entry["bounce"] or entry["compl"]:
            out = frozen(entry, "rollover", ts_ms)
        reset_month(entry, month)
    if day > entry["day"]:
        entry.update(today=0, day=day)
    return out


def decide(entry: dict[str, Any]) -> tuple[bool, str | None]:
    """Check the quotas for one more message and count it when allowed (mutates ``entry``).

    Hard enforcement rejects (not counted); soft enforcement allows, counts, and names the limit."""
    reason = None
    if entry["status"] == "suspended":
        reason = "outbound_suspended"
    elif entry["daily"] > 0 and entry["today"] >= entry["daily"]:
        reason = "daily_limit_exceeded"
    elif entry["monthly"] > 0 and entry["msent"] >= entry["monthly"]:
        reason = "monthly_limit_exceeded"
    if reason is not None and entry["enf"] == "hard":
        return False, reason
    entry["today"] += 1
    entry["msent"] += 1
    return True, (reason + "_soft") if reason else None


def counters_at(status: dict[str, Any] | None, ts_ms: int) -> dict[str, int]:
    """The counters a reader shows at ``ts_ms``: a snapshot from an earlier day/month reads as zero
    (the ledger rolls it over on its next command or timer tick)."""
    if not status:
        return {"sent_today": 0, "sent_month": 0, "bounce_count": 0, "complaint_count": 0}
    day, month = period(ts_ms)
    same_month = status["month"] >= month
    return {
        "sent_today": status["sent_today"] if status["day"] >= day else 0,
        "sent_month": status["sent_month"] if same_month else 0,
        "bounce_count": status["bounce_count"] if same_month else 0,
        "complaint_count": status["complaint_count"] if same_month else 0,
    }


def status_record(entry: dict[str, Any], ts_ms: int) -> dict[str, Any]:
    return {"name": entry["name"], "tenant_id": entry["tenant"], "day": entry["day"], "month": entry["month"],
            "sent_today": entry["today"], "sent_month": entry["msent"], "bounce_count": entry["bounce"],
            "complaint_count": entry["compl"], "updated_ts": ts_ms, "status": entry["status"],
            "suspension_evidence": entry.get("ev")}


def check(entry: dict[str, Any], ts_ms: int) -> tuple[bool, str | None]:
    """What one more message would get (the sender's pre-send check); ``entry`` is not changed."""
    probe = dict(entry)
    roll(probe, ts_ms)
    return decide(probe)


def count_sent(entry: dict[str, Any], event_ts_ms: int) -> bool:
    """Count one sent message of the domain (mutates ``entry``, already rolled to now): only into
    the day/month it belongs to, so re-reading old events never inflates the current counters."""
    day, month = period(event_ts_ms)
    if month != entry["month"]:
        return False
    entry["msent"] += 1
    if day == entry["day"]:
        entry["today"] += 1
    return True


def auto_suspend(entry: dict[str, Any], threshold_pct: float, min_sent: int, ts_ms: int) -> bool:
    """Suspend an active domain whose month's bounce rate passed ``threshold_pct`` over at least
    ``min_sent`` sent messages, recording the evidence. Returns True when it suspended now."""
    if entry["status"] == "suspended" or entry["msent"] < min_sent:
        return False
    bounce_rate = rate(entry["bounce"], entry["msent"])
    if bounce_rate <= threshold_pct:
        return False
    entry["status"] = "suspended"
    entry["ev"] = {"reason": "bounce_rate_exceeded", "window": f"month {entry['month']}", "sent_count": entry["msent"],
                   "bounce_count": entry["bounce"], "complaint_count": entry["compl"], "bounce_rate": bounce_rate,
                   "threshold": float(threshold_pct), "min_volume": int(min_sent), "suspended_ts": ts_ms}
    return True
