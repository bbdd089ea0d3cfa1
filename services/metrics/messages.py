"""Message projection: every accepted message (from ``messages.add`` commands), combined at query
time with its delivery events, the acknowledgements of its reports (``postbus.reports``) and the
lifecycle marks of delete / cleanup / tenant-delete commands.

Why query-time aggregation: every table is append-only and keyed so that a re-loaded batch (crash
between insert and offset store) only duplicates rows, and every query aggregates with functions a
duplicate cannot change (argMax by sequence, max, DISTINCT event ids). No merge, mutation or FINAL
is needed for exact answers, and a replay from offset 0 rebuilds the same state.

Ordering: commands are keyed by tenant, so one tenant's commands share a partition and their
offsets order them. ``seq = offset * SEQ_STRIDE + index in the command`` orders submissions; a mark
hides the submissions with a smaller seq (a message re-submitted after a delete is visible again),
except that a delete mark does not hide a submission the sender had already finished (sent, error,
rejected: the sender deletes pending messages only).

Sent is final per id: the sender never sends an id twice, so when an earlier submission of an id was
sent, a later one (accepted before the API could see the send, or overtaking it in flight) shows that
send, not a pending message that will never go out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any

from services.common.netpolicy import safe_url

if TYPE_CHECKING:
    from services.metrics.store import Store

SEQ_STRIDE = 100_000  # > messages per command record
REPORTABLE = ("sent", "error", "deferred", "rejected")  # the types the reporter sends to clients
FINAL = ("sent", "error", "rejected")
ACTIVE = ("pending", "deferred")

MESSAGE_COLUMNS: tuple[str, ...] = (
    "tenant_id", "id", "pk", "account_id", "priority", "batch_code", "deferred_ms", "accepted_ms",
    "subject", "from_addr", "to_addrs", "seq", "rcpt_addrs", "payload",
)
MARK_COLUMNS: tuple[str, ...] = ("tenant_id", "id", "kind", "seq", "ts_ms")
REPORTED_COLUMNS: tuple[str, ...] = ("tenant_id", "event_id", "message_id", "ts_ms")

DDL = [
    # one row per submission; a re-sent pending id is a new submission (new pk, higher seq)
    """
    CREATE TABLE IF NOT EXISTS messages (
        tenant_id String,
        id String,
        pk String,
        account_id String,
        priority Int8,
        batch_code String,
        deferred_ms Int64,
        accepted_ms Int64,
        subject String,
        from_addr String,
        to_addrs Array(String),
        seq UInt64,
        INDEX idx_id id TYPE bloom_filter(0.01) GRANULARITY 4
    )
    ENGINE = ReplacingMergeTree
    ORDER BY (tenant_id, id, pk)
    """,
    # every envelope recipient (to + cc + bcc, bare, lower case): inbound feedback is attributed
    # only to these (services/metrics/inbound_lookup.py); added to older tables
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS rcpt_addrs Array(String) DEFAULT []",
    # the message as submitted (client field names; secrets and attachment contents excluded), JSON
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS payload String DEFAULT ''",
    # delete / cleanup marks per id; tenant deletion is a mark with id ''
    """
    CREATE TABLE IF NOT EXISTS message_marks (
        tenant_id String,
        id String,
        kind LowCardinality(String),
        seq UInt64,
        ts_ms Int64
    )
    ENGINE = ReplacingMergeTree
    ORDER BY (tenant_id, id, kind, seq)
    """,
    # one row per acknowledged report (event) of a tenant
    """
    CREATE TABLE IF NOT EXISTS reported (
        tenant_id String,
        event_id String,
        message_id String,
        ts_ms Int64
    )
    ENGINE = ReplacingMergeTree
    ORDER BY (tenant_id, message_id, event_id)
    """,
]
DROP = ["DROP TABLE IF EXISTS messages", "DROP TABLE IF EXISTS message_marks", "DROP TABLE IF EXISTS reported"]


# -- rows from records ----------------------------------------------------------------------------

def message_rows(add: dict[str, Any], offset: int) -> list[list[Any]]:
    """An AddMessages payload read at ``offset`` of the commands topic -> ``messages`` rows."""
    rows = []
    for i, m in enumerate(add["messages"]):
        rows.append([
            m["tenant_id"], m["id"], m["pk"], m.get("account_id") or "", int(m.get("priority", 2)),
            m.get("batch_code") or "", int(m.get("deferred_ts") or 0), int(m["accepted_ts"]),
            m.get("subject") or "", m.get("from_addr") or "", list(m.get("to") or []),
            offset * SEQ_STRIDE + i,
            envelope_recipients(m),
            json.dumps(submitted_payload(m), separators=(",", ":"), ensure_ascii=False),
        ])
    return rows


def submitted_payload(m: dict[str, Any]) -> dict[str, Any]:
    """The seed's ``payload``: the message as the client submitted it, in the client's field names,
    without secrets (attachment auth) or attachment contents (base64 data; an ``http_url``'s query
    and userinfo, where signed-URL credentials live)."""
    out: dict[str, Any] = {"id": m["id"], "account_id": m.get("account_id") or None, "from": m.get("from_addr"),
                           "to": list(m.get("to") or [])}
    for name in ("cc", "bcc"):
        if m.get(name):
            out[name] = list(m[name])
    for name in ("reply_to", "return_path", "subject", "message_id", "batch_code", "track_opens", "track_clicks"):
        if m.get(name) is not None:
            out[name] = m[name]
    if m.get("body_html") is not None and m.get("body_text") is None:
        out["body"], out["content_type"] = m["body_html"], "html"
    else:
        out["body"] = m.get("body_text")
        if m.get("body_html") is not None:
            out["html"] = m["body_html"]
    if m.get("headers"):
        out["headers"] = dict(m["headers"])
    out["priority"] = int(m.get("priority", 2))
    if m.get("deferred_ts"):
        out["deferred_ts"] = round(int(m["deferred_ts"]) / 1000.0, 3)
    if m.get("attachments"):
        out["attachments"] = [_attachment_descriptor(a) for a in m["attachments"]]
    return out


def _attachment_descriptor(a: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {"filename": a.get("filename"), "fetch_mode": a.get("fetch_mode")}
    mode = a.get("fetch_mode")
    if mode == "http_url":
        d["storage_path"] = safe_url(a.get("storage_path") or "")
    elif mode != "base64":  # endpoint / storage: a path, not content
        d["storage_path"] = a.get("storage_path")
    for name in ("mime_type", "content_md5"):
        if a.get(name):
            d[name] = a[name]
    if a.get("auth"):
        d["auth"] = {"method": a["auth"].get("method")}  # never the secret
    return d


def envelope_recipients(m: dict[str, Any]) -> list[str]:
    """The bare, lower-case addresses of to + cc + bcc (the message's envelope recipients)."""
    raw = [*(m.get("to") or []), *(m.get("cc") or []), *(m.get("bcc") or [])]
    return list(dict.fromkeys(a.strip().lower() for _, a in getaddresses(raw) if "@" in a))


def mark_rows(tenant_id: str, ids: Iterable[str], kind: str, offset: int, ts_ms: int) -> list[list[Any]]:
    # the mark sorts after every submission of earlier commands (their seq < offset * stride)
    return [[tenant_id, i, kind, offset * SEQ_STRIDE, ts_ms] for i in dict.fromkeys(ids)]


def reported_rows(ack: dict[str, Any]) -> list[list[Any]]:
    mids = list(ack.get("message_ids") or [])
    return [
        [ack["tenant_id"], eid, mids[i] if i < len(mids) else "", int(ack["ts"])]
        for i, eid in enumerate(ack.get("event_ids") or [])
    ]


# -- state ----------------------------------------------------------------------------------------

def _sec(ms: int | None) -> float | None:
    return None if not ms else round(ms / 1000.0, 3)


@dataclass
class MessageState:
    id: str
    pk: str
    tenant_id: str
    sub: dict[str, Any] | None  # latest submission, None for ids only known from events
    status: str
    seq: int
    sent_ms: int = 0
    error_ms: int = 0
    error: str | None = None
    reported_ms: int = 0
    last_event_ms: int = 0
    n_reportable: int = 0
    n_reported: int = 0
    next_try_ms: int = 0  # the deferral of the last event, when it is a deferral
    attempts: int = 0  # SMTP attempts so far

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (self.sub["accepted_ms"] if self.sub else self.last_event_ms, self.seq, self.id)

    @property
    def fully_reported(self) -> bool:
        return self.n_reportable > 0 and self.n_reported >= self.n_reportable

    def as_dict(self) -> dict[str, Any]:
        s = self.sub or {}
        out = {
            "pk": self.pk or None,
            "id": self.id,
            "tenant_id": self.tenant_id,
            "account_id": s.get("account_id") or None,
            "priority": s.get("priority", 2) if s else None,
            "batch_code": s.get("batch_code") or None,
            # when it will be tried next: the sender's deferral (retry, rate limit, throttle), else
            # the client's requested time
            "deferred_ts": _sec(self.next_try_ms if self.status == "deferred" and self.next_try_ms
                                else s.get("deferred_ms")),
            "retry_count": self.attempts,
            "sent_ts": _sec(self.sent_ms),
            "smtp_ts": _sec(self.sent_ms),  # the seed's name for the send time
            "error_ts": _sec(self.error_ms),
            "error": self.error,
            "reported_ts": _sec(self.reported_ms),
            "status": self.status,
            "subject": s.get("subject"),
            "accepted_ts": _sec(s.get("accepted_ms")),
        }
        if not s:
            out["payload"] = None
        elif s.get("payload"):
            out["payload"] = json.loads(s["payload"])
        else:  # rows ingested before the payload column: what the projection kept
            out["payload"] = {"id": self.id, "from": s.get("from_addr"), "to": s.get("to_addrs") or [],
                              "subject": s.get("subject"), "account_id": out["account_id"],
                              "priority": out["priority"], "batch_code": out["batch_code"],
                              "deferred_ts": _sec(s.get("deferred_ms"))}
        return out


def _ids_filter(column: str, ids: Sequence[str] | None) -> str:
    return f" AND {column} IN {{ids:Array(String)}}" if ids is not None else ""


def message_states(store: Store, tenant_id: str, ids: Sequence[str] | None = None,
                   now_ms: int | None = None) -> list[MessageState]:
    """Every visible (not deleted, not cleaned) message of the tenant, or only those in ``ids``."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    params: dict[str, Any] = {"t": tenant_id, "ids": list(ids or []), "rep": list(REPORTABLE)}
    subs_sql = f"""
        SELECT id, argMax(pk, seq), argMax(account_id, seq), argMax(priority, seq), argMax(batch_code, seq),
               argMax(deferred_ms, seq), argMax(accepted_ms, seq), argMax(subject, seq),
               argMax(from_addr, seq), argMax(to_addrs, seq), max(seq), argMax(payload, seq)
        FROM messages WHERE tenant_id = {{t:String}}{_ids_filter("id", ids)}
        GROUP BY id
    """
    # events deduplicated by event_id, joined with their acknowledgement, aggregated per submission
    events_sql = f"""
        SELECT e.mid, e.epk,
               maxIf(e.ms, e.etype = 'sent'),
               maxIf(e.ms, e.etype IN ('error', 'rejected')),
               argMaxIf(e.err, e.ms, e.etype IN ('error', 'rejected')),
               argMax(e.etype, e.ms),
               max(e.ms),
               countIf(e.etype IN {{rep:Array(String)}}),
               countIf(e.etype IN {{rep:Array(String)}} AND r.rms > 0),
               max(r.rms),
               countIf(e.etype = 'sent'), countIf(e.etype = 'error'), countIf(e.etype = 'rejected'),
               countIf(e.etype = 'deleted'),
               argMax(e.du, e.ms), max(e.att)
        FROM (
            SELECT event_id, any(message_id) AS mid, any(pk) AS epk, any(type) AS etype,
                   toUnixTimestamp64Milli(any(ts)) AS ms, any(error) AS err,
                   if(any(type) = 'deferred', toUnixTimestamp64Milli(any(deferred_until)), 0) AS du,
                   if(any(type) IN ('sent', 'error', 'deferred'), any(attempt), 0) AS att
            FROM events WHERE tenant_id = {{t:String}}{_ids_filter("message_id", ids)}
            GROUP BY event_id
        ) AS e
        LEFT JOIN (
            SELECT event_id, max(ts_ms) AS rms FROM reported
            WHERE tenant_id = {{t:String}}{_ids_filter("message_id", ids)}
            GROUP BY event_id
        ) AS r ON e.event_id = r.event_id
        GROUP BY e.mid, e.epk
    """
    # per id: the newest delete mark, the newest cleanup / tenant-delete mark, the newest mark's time
    marks_sql = f"""
        SELECT id, maxIf(seq, kind = 'deleted'), maxIf(seq, kind != 'deleted'), max(ts_ms) FROM message_marks
        WHERE tenant_id = {{t:String}} AND (id = ''{" OR id IN {ids:Array(String)}" if ids is not None else " OR 1"})
        GROUP BY id
    """
    with store._lock:
        subs = store._client.query(subs_sql, parameters=params).result_rows
        evs = store._client.query(events_sql, parameters=params).result_rows
        marks = store._client.query(marks_sql, parameters=params).result_rows
    # id -> (delete mark seq, cleanup / tenant-delete mark seq, newest mark ms); 0 = none
    mark_by_id = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in marks}
    no_mark = (-1, -1, -1)
    tenant_mark = mark_by_id.pop("", no_mark)
    tenant_hide_seq, tenant_ms = max(tenant_mark[0], tenant_mark[1]), tenant_mark[2]
    groups: dict[str, dict[str, tuple[Any, ...]]] = {}
    for row in evs:
        groups.setdefault(row[0], {})[row[1]] = row

    out: list[MessageState] = []
    for r in subs:
        mid, seq = r[0], int(r[10])
        sub = {"pk": r[1], "account_id": r[2], "priority": int(r[3]), "batch_code": r[4],
               "deferred_ms": int(r[5]), "accepted_ms": int(r[6]), "subject": r[7], "from_addr": r[8],
               "to_addrs": list(r[9]), "payload": r[11]}
        delete_seq, hide_seq, _ = mark_by_id.get(mid, no_mark)
        if max(hide_seq, tenant_hide_seq) > seq:
            continue  # cleaned up, or its tenant deleted
        st = MessageState(mid, sub["pk"], tenant_id, sub, "pending", seq)
        by_pk = groups.get(mid, {})
        ev = by_pk.get(sub["pk"])
        if ev is None or not ev[10]:
            # the sender never sends an id twice: a sent earlier submission is the id's outcome,
            # whatever was queued after it (ignored by the sender as already sent, or overtaken
            # while that send was in flight). Never "pending forever".
            earlier = [row for pk, row in by_pk.items() if pk != sub["pk"] and row[10] and int(row[2]) > tenant_ms]
            if earlier:
                ev = max(earlier, key=lambda row: int(row[2]))
                st.pk = ev[1]
        if delete_seq > seq and not (ev is not None and (ev[10] or ev[11] or ev[12])):
            continue  # deleted; unless the sender had already finished it (it deletes pending ones only)
        if ev is None and sub["deferred_ms"] > now_ms:
            st.status = "deferred"  # not sent before deferred_ts
        _apply_events(st, ev)
        if st.status != "deleted":
            out.append(st)
    known = {s.id for s in out} | {r[0] for r in subs}
    # ids known only from events (rejected at the API, submission never appended)
    for mid, by_pk in groups.items():
        if mid in known:
            continue
        ev = max(by_pk.values(), key=lambda row: row[6])
        mark_ms = max(mark_by_id.get(mid, no_mark)[2], tenant_mark[2])
        if mark_ms >= int(ev[6]):
            continue
        st = MessageState(mid, ev[1], tenant_id, None, "pending", 0)
        _apply_events(st, ev)
        if st.status != "deleted":
            out.append(st)
    out.sort(key=lambda s: s.sort_key)
    return out


def _apply_events(st: MessageState, ev: tuple[Any, ...] | None) -> None:
    if ev is None:
        return
    (_, _, sent_ms, err_ms, err, last_type, last_ms, n_rep, n_done, rep_ms,
     n_sent, n_error, n_rejected, n_deleted, last_du, attempts) = ev
    st.sent_ms, st.error_ms, st.last_event_ms = int(sent_ms), int(err_ms), int(last_ms)
    st.error = err or None if err_ms else None
    st.n_reportable, st.n_reported, st.reported_ms = int(n_rep), int(n_done), int(rep_ms or 0)
    st.next_try_ms = int(last_du or 0) if last_type == "deferred" else 0
    st.attempts = int(attempts or 0)
    # final outcomes win over the event order (a late duplicate deferred cannot reopen a sent message)
    if n_deleted:
        st.status = "deleted"
    elif n_sent:
        st.status = "sent"
    elif n_error:
        st.status = "error"
    elif n_rejected:
        st.status = "rejected"
    elif last_type == "deferred":
        st.status = "deferred"


def message_history(store: Store, tenant_id: str, states: Sequence[MessageState]) -> dict[str, list[dict[str, Any]]]:
    """Events of each listed message (its current submission), in event order."""
    if not states:
        return {}
    pk_of = {s.id: s.pk for s in states}
    with store._lock:
        rows = store._client.query(
            """
            SELECT e.mid, e.epk, e.event_id, e.etype, e.ms, e.err, e.code, e.du, e.reason, e.att, r.rms
            FROM (
                SELECT event_id, any(message_id) AS mid, any(pk) AS epk, any(type) AS etype,
                       toUnixTimestamp64Milli(any(ts)) AS ms, any(error) AS err, any(smtp_code) AS code,
                       toUnixTimestamp64Milli(any(deferred_until)) AS du, any(deferred_reason) AS reason,
                       any(attempt) AS att, min(kafka_partition) AS kp, min(kafka_offset) AS ko
                FROM events WHERE tenant_id = {t:String} AND message_id IN {ids:Array(String)}
                GROUP BY event_id
            ) AS e
            LEFT JOIN (
                SELECT event_id, max(ts_ms) AS rms FROM reported
                WHERE tenant_id = {t:String} AND message_id IN {ids:Array(String)}
                GROUP BY event_id
            ) AS r ON e.event_id = r.event_id
            ORDER BY e.ms, e.kp, e.ko, e.event_id
            """,
            parameters={"t": tenant_id, "ids": list(pk_of)},
        ).result_rows
    out: dict[str, list[dict[str, Any]]] = {s.id: [] for s in states}
    for mid, pk, eid, type_, ms, error, code, du, reason, attempt, rms in rows:
        if pk_of.get(mid) not in (pk, ""):
            continue  # an earlier, replaced submission of the same id
        out[mid].append({
            "event_id": eid, "type": type_, "event_type": type_, "ts": _sec(ms), "error": error or None,
            "smtp_code": code,
            "deferred_until": _sec(du), "deferred_reason": reason or None, "attempt": int(attempt),
            "reported_ts": _sec(rms),
        })
    return out


def other_tenant_ids(store: Store, tenant_id: str, ids: Sequence[str]) -> list[str]:
    if not ids:
        return []
    with store._lock:
        rows = store._client.query(
            "SELECT DISTINCT id FROM messages WHERE id IN {ids:Array(String)} AND tenant_id != {t:String}",
            parameters={"t": tenant_id, "ids": list(ids)},
        ).result_rows
    return [r[0] for r in rows]


def list_messages(store: Store, tenant_id: str, *, active_only: bool = False, include_history: bool = False,
                  limit: int = 1000, offset: int = 0) -> dict[str, Any]:
    states = message_states(store, tenant_id)
    if active_only:
        states = [s for s in states if s.status in ACTIVE]
    page = states[offset:offset + limit]
    items = [s.as_dict() for s in page]
    if include_history:
        hist = message_history(store, tenant_id, page)
        for item in items:
            item["history"] = hist.get(item["id"], [])
    return {"messages": items, "total": len(states)}


def lookup(store: Store, tenant_id: str, ids: Sequence[str]) -> dict[str, list[str]]:
    wanted = list(dict.fromkeys(ids))
    states = {s.id: s for s in message_states(store, tenant_id, wanted)}
    pending = [i for i in wanted if i in states and states[i].status in ACTIVE]
    final = [i for i in wanted if i in states and states[i].status in FINAL]
    missing = [i for i in wanted if i not in states]
    foreign = set(other_tenant_ids(store, tenant_id, missing))
    return {"pending": pending, "final": final, "other_tenants": [i for i in missing if i in foreign]}


def cleanup_ids(store: Store, tenant_id: str, older_than_seconds: float, now_ms: int | None = None) -> list[str]:
    """Final messages whose every reportable event was acknowledged, last event older than the threshold."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    cutoff = now_ms - int(older_than_seconds * 1000)
    return [
        s.id for s in message_states(store, tenant_id, now_ms=now_ms)
        if s.status in FINAL and s.fully_reported and s.last_event_ms <= cutoff
    ]
