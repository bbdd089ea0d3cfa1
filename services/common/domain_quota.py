"""Outbound quota and ownership rules of a sending domain, shared by the ledger (sender) and the
API (reads, registration, queueing).

A ledger entry is a small JSON dict: the domain's limits as last applied from a ``domain.update``
command, its counters for the current UTC day and month, and ``off``, the offset of the last
command applied to it (commands of a domain always come through one partition, its tenant's ``cp``
(= ``p`` until the domain changes hands), so a replayed command is recognised and not counted
twice); ``ver``: whether its tenant verified it, as the commands said."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parseaddr
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


# --- ownership of a domain name --------------------------------------------------------------------
#
# The Domain records on ``postbus.config.domains`` (one per name, written with their command) are
# the projection every reader decides ownership from: the API (registration, queueing) and the
# sender (defence in depth before each send). A record's tenant holds the name; a *verified* record
# (its verification TXT token and DKIM key found in DNS) is owned for good, while an unverified one
# is only a claim: it lets its tenant verify, it blocks nobody's mail, and once ``expiry`` has
# passed since the claim was made (``created_ts``, never renewed by updates) another tenant may
# register the name. Another tenant that proves DNS control (its own challenge token, see
# routes_domains) takes an unverified claim over at once.

FREE, OWN = "free", "own"
VERIFIED_OTHER, PENDING_OTHER, EXPIRED_OTHER = "verified_other", "pending_other", "expired_other"
NOT_OWNED = "sender_domain_not_owned"
NOT_VERIFIED = "sender_domain_not_verified"


def claim_expires_ms(rec: dict[str, Any], expiry_ms: int) -> int:
    """When an unverified claim stops protecting its name against another tenant's registration."""
    return int(rec.get("created_ts") or 0) + expiry_ms


def claim_state(rec: dict[str, Any] | None, tenant_id: str, now: int, expiry_ms: int) -> str:
    """What a registration of ``rec``'s name by ``tenant_id`` meets at ``now`` (epoch ms):
    FREE (no record), OWN, VERIFIED_OTHER (refused: sender_domain_not_owned), PENDING_OTHER (another
    tenant's unverified claim, still live) or EXPIRED_OTHER (another tenant's expired claim: taken over)."""
    if rec is None:
        return FREE
    if rec["tenant_id"] == tenant_id:
        return OWN
    if rec.get("verified"):
        return VERIFIED_OTHER
    return EXPIRED_OTHER if now >= claim_expires_ms(rec, expiry_ms) else PENDING_OTHER


def from_domain(from_addr: str | None) -> str:
    """The domain of a From address (``Name <local@domain>`` or a bare address), lower case; ''
    without one. The API and the sender parse it the same way (the sender's dkim_core does too)."""
    local, at, domain = parseaddr(from_addr or "")[1].rpartition("@")
    return domain.rstrip(".").lower() if at and local else ""


def sending_refusal(lookup: Callable[[str], dict[str, Any] | None], domain: str, tenant_id: str) -> str | None:
    """Why mail of ``tenant_id`` From ``domain`` may not go out, or None when it may.

    - the domain is the tenant's own registered domain and not verified yet: NOT_VERIFIED
      ("Outbound email is blocked until the domain is verified");
    - otherwise the nearest *verified* name at or above the domain decides (``news.example.com``
      falls under a verified ``example.com``): another tenant's -> NOT_OWNED. Another tenant's
      unverified claim blocks nothing, and a name nobody verified is not limited here."""
    if not domain:
        return None
    rec = lookup(domain)
    if rec is not None and rec["tenant_id"] == tenant_id:
        return None if rec.get("verified") else NOT_VERIFIED
    name = domain
    while "." in name:  # the name itself, then each parent above it, never a bare top-level label
        rec = lookup(name)
        if rec is not None and rec.get("verified"):
            return None if rec["tenant_id"] == tenant_id else NOT_OWNED
        name = name.split(".", 1)[1]
    return None


def refusal_text(code: str, domain: str) -> str:
    """The reason of a refused message: the stable code first, then what it means."""
    if code == NOT_OWNED:
        return f"{code}: the From domain {domain} is verified by another tenant"
    return f"{code}: the From domain {domain} is registered but not verified; outbound email is blocked " \
           "until the domain is verified"


def released(entry: dict[str, Any], tenant_id: str, cmd_partition: int, ts_ms: int) -> tuple[
        dict[str, Any], dict[str, Any] | None]:
    """The ledger entry of a domain whose unverified claim passed to ``tenant_id`` (expired, or
    out-proved in DNS), and the billing record of what the previous tenant counted this month (None
    if nothing). The entry keeps its changelog partition ``p`` (a key lives on one changelog
    partition for good) and follows the new tenant's command partition ``cp``; counters start at
    zero, and ``since`` keeps the new tenant's events from before the takeover out of them."""
    old = dict(entry)
    roll(old, ts_ms)
    billing = frozen(old, "released", ts_ms) if (old["msent"] or old["bounce"] or old["compl"]) else None
    new = new_entry(entry["name"], tenant_id, entry["p"], ts_ms)
    new.update(cp=cmd_partition, since=ts_ms, ver=False)
    return new, billing


# --- idempotent increments and mail Postbus sent itself ---------------------------------------------
#
# ``domain.increment`` may name what it counts: an idempotency key (the client's ``Idempotency-Key``)
# or the ``X-Postbus-Message-Id`` of a message Postbus sent. The ledger keeps one small record per
# such name (its ``marks`` table, key ``mark_key``) for ``window_ms``: a later increment with the same
# name counts nothing and gets the original answer; a message id is also marked when the message's
# own ``sent`` event is counted, so a message Postbus sent is counted once, by its send or by the
# client's increment, whichever reaches the ledger first.

MARK_KEY, MARK_MESSAGE = "k", "m"
MAX_KEY_LEN = 255


def mark_key(tenant_id: str, name: str, kind: str, value: str) -> str:
    """Key of a mark in the ledger's marks table: scoped to the tenant and the domain."""
    return "\x1f".join((tenant_id, name, kind, value))


def valid_key(value: str) -> bool:
    """An idempotency key or message id: 1-255 printable characters, no control characters."""
    return 0 < len(value) <= MAX_KEY_LEN and value.isprintable()


def increment_mark(cmd: dict[str, Any], tenant_id: str, name: str) -> str | None:
    """The mark an increment command names (its message id first, else its idempotency key)."""
    if cmd.get("message_id"):
        return mark_key(tenant_id, name, MARK_MESSAGE, cmd["message_id"])
    if cmd.get("idempotency_key"):
        return mark_key(tenant_id, name, MARK_KEY, cmd["idempotency_key"])
    return None


def live_mark(mark: dict[str, Any] | None, ts_ms: int, window_ms: int) -> dict[str, Any] | None:
    """The mark if it is still within the window at ``ts_ms`` (a command's or an event's time)."""
    if mark is None or ts_ms - int(mark["ts"]) >= window_ms:
        return None
    return mark


def new_mark(entry: dict[str, Any], source: str, allowed: bool, reason: str | None, counted: bool,
             ts_ms: int, partition: int) -> dict[str, Any]:
    """What a counted (or refused) increment or a counted send leaves behind: the answer a retry
    gets (``res``, counters ``today``/``month`` as they were then), ``src`` ``inc`` or ``sent``,
    ``c`` whether it counted, ``m`` whether the message's send has been matched with it, ``p`` its
    changelog partition, ``w`` when it was written (wall clock, for the purge)."""
    return {"ts": ts_ms, "w": now_ms(), "p": partition, "src": source, "res": [allowed, reason],
            "today": entry["today"], "month": entry["msent"], "c": counted, "m": source == "sent", "so": -1}


def sent_answer(entry: dict[str, Any]) -> tuple[bool, str | None]:
    """The answer recorded for a message Postbus sent (before counting it): it went out, so it is
    allowed; over a limit of a soft domain the reason names it (``<limit>_soft``), as an increment
    would have; a hard domain's sender let it through before the limit, so no reason."""
    probe = dict(entry)
    allowed, reason = decide(probe)
    return True, (reason if allowed else None)


def send_counts(mark: dict[str, Any] | None) -> bool:
    """Whether a ``sent`` event whose message id has ``mark`` is still to be counted: not when the
    message was counted already, by an increment naming it or by an earlier ``sent`` event (a
    message resent after a sender crash, docs/architecture.md "Delivery guarantees", is one
    message: counted once, as the analytics count it)."""
    return mark is None or not mark["c"]


def purge_before(marks: dict[str, dict[str, Any]], now: int, window_ms: int) -> list[str]:
    """Keys of the marks written more than ``window_ms`` before ``now`` (to be deleted)."""
    return [k for k, m in marks.items() if now - int(m.get("w", m["ts"])) >= window_ms]


def increment_once(entry: dict[str, Any], mark: dict[str, Any] | None, keyed: bool, ts_ms: int,
                   partition: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One ``domain.increment`` whose named mark (``keyed``) is ``mark`` (live, or None).

    Returns ``(replay, new)``: ``replay`` is the mark when it exists (answer its first answer, count
    nothing); otherwise the entry is decided and counted (``decide``, ``entry["res"]``) and ``new`` is
    the mark to store (None for an increment that names none)."""
    if mark is not None:
        return mark, None
    allowed, reason = decide(entry)
    entry["res"] = [allowed, reason]
    return None, (new_mark(entry, "inc", allowed, reason, allowed, ts_ms, partition) if keyed else None)


def send_once(entry: dict[str, Any], mark: dict[str, Any] | None, event_ts_ms: int, partition: int) -> dict[str, Any]:
    """One ``sent`` event of a registered domain whose message id has ``mark`` (live, or None):
    counted (``count_sent``) unless an increment naming the message counted it first. Returns the
    mark to store."""
    if not send_counts(mark):
        return {**(mark or {}), "m": True, "w": now_ms()}  # the increment counted it
    allowed, reason = sent_answer(entry)
    count_sent(entry, event_ts_ms)
    if mark is None:
        return new_mark(entry, "sent", allowed, reason, True, event_ts_ms, partition)
    return {**mark, "c": True, "m": True, "w": now_ms()}  # a send the increment refused
