"""Queries for the inbound service (services/inbound): which message an inbound report is
about, and which PEC messages are still waiting for their acceptance receipt.

Both read projections that already exist (``messages`` from the command topic, ``events``), so a
replay rebuilds them and the inbound service keeps no state of its own for them."""

from __future__ import annotations

from email.utils import getaddresses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.metrics.store import Store


def resolve(store: Store, tenant_id: str | None, message_id: str | None, pk: str | None) -> dict[str, Any] | None:
    """The submission a report refers to: by (tenant, id) — the newest submission — or by pk (the
    local part of a generated Message-ID). None when unknown.

    ``recipients``: the envelope recipients (to + cc + bcc, bare, lower case) the report may name —
    by (tenant, id) those of every submission of the id, by pk those of that submission. Feedback
    (bounce, complaint) is attributed only to these: a report naming anyone else is refused by the
    caller. Rows written before the ``rcpt_addrs`` column existed fall back to their To addresses."""
    with store._lock:
        if tenant_id and message_id:
            rows = store._client.query(
                "SELECT tenant_id, id, argMax(pk, seq), argMax(account_id, seq), argMax(from_addr, seq), "
                "groupUniqArrayArray(rcpt_addrs), groupUniqArrayArray(to_addrs) "
                "FROM messages WHERE tenant_id = {t:String} AND id = {i:String} GROUP BY tenant_id, id",
                parameters={"t": tenant_id, "i": message_id}).result_rows
        elif pk:
            rows = store._client.query(
                "SELECT tenant_id, id, pk, account_id, from_addr, rcpt_addrs, to_addrs "
                "FROM messages WHERE pk = {p:String} LIMIT 1",
                parameters={"p": pk}).result_rows
        else:
            return None
    if not rows:
        return None
    t, i, p, account, from_addr, rcpts, to_addrs = rows[0]
    return {"tenant_id": t, "id": i, "pk": p or None, "account_id": account or None, "from_addr": from_addr,
            "recipients": recipients_of(list(rcpts), list(to_addrs))}


def recipients_of(rcpt_addrs: list[str], to_addrs: list[str]) -> list[str]:
    """Sorted bare lower-case recipients; ``to_addrs`` (display form) only adds rows that predate
    ``rcpt_addrs`` (for newer rows it is a subset of it)."""
    out = {a.strip().lower() for a in rcpt_addrs if "@" in a}
    out.update(a.strip().lower() for _, a in getaddresses(to_addrs) if "@" in a)
    return sorted(out)


def pec_overdue(store: Store, domains: list[str], sent_before_ms: int, sent_after_ms: int,
                limit: int = 1000) -> list[dict[str, Any]]:
    """Messages sent from a PEC domain between the two times that have no ``pec`` event at all (an
    acceptance, a delivery, an error or an earlier timeout each end the wait)."""
    if not domains:
        return []
    with store._lock:
        rows = store._client.query(
            """
            SELECT tenant_id, message_id, anyIf(account_id, type = 'sent'), anyIf(pk, type = 'sent'),
                   anyIf(sender_domain, type = 'sent')
            FROM events
            WHERE ts >= fromUnixTimestamp64Milli({after:Int64}, 'UTC')
              AND ((type = 'sent' AND sender_domain IN {d:Array(String)}) OR type = 'pec')
            GROUP BY tenant_id, message_id
            HAVING countIf(type = 'pec') = 0 AND countIf(type = 'sent') > 0
               AND minIf(ts, type = 'sent') < fromUnixTimestamp64Milli({before:Int64}, 'UTC')
            LIMIT {lim:UInt32}
            """,
            parameters={"d": [d.lower() for d in domains], "before": int(sent_before_ms),
                        "after": int(sent_after_ms), "lim": int(limit)}).result_rows
    return [{"tenant_id": t, "message_id": m, "account_id": a or None, "pk": p or None, "sender_domain": d}
            for t, m, a, p, d in rows]
