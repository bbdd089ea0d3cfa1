"""What the CLI rebuilds from the log, as pure functions over decoded records (unit-tested without a
broker): one message's timeline (``trace``) and a tenant's configuration and queue at a time
(``state-at``).

Inputs are command entries (``kafka.command_entry``: the envelope, its redacted ``payload`` and the
raw ``_payload``), delivery events and report acknowledgements, each with its topic position."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from services.common.redaction import redact

# message lifecycle commands whose payload names message ids
_ID_LIST_COMMANDS = ("messages.delete", "messages.cleanup")
# engagement commands (tracking pixels / links, SES feedback): payload Engagement with message_id
_ENGAGEMENT_COMMANDS = ("tracking.open", "tracking.click", "tracking.unsubscribe", "feedback.bounce",
                        "feedback.complaint")
# the command types trace / state-at look at (the others' payloads are not even decoded)
TRACE_COMMANDS = frozenset({"messages.add", "messages.reject", *_ID_LIST_COMMANDS, *_ENGAGEMENT_COMMANDS})
STATE_COMMANDS = frozenset({"tenant.create", "tenant.update", "tenant.delete", "account.upsert", "account.delete",
                            "messages.suspend", "messages.activate", "messages.add", "messages.reject",
                            *_ID_LIST_COMMANDS})
FINAL_EVENTS = ("sent", "error", "rejected", "deleted")  # a message that had one is no longer queued
_EVENT_FIELDS = ("event_id", "type", "attempt", "smtp_code", "error", "deferred_reason", "deferred_until",
                 "account_id", "batch_code", "recipient", "bounce_type", "bounce_code", "bounce_reason",
                 "feedback_type", "url", "source", "pec_event")


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- trace ----------------------------------------------------------------------------------------
def command_items(entry: dict[str, Any], tenant_id: str, message_id: str) -> list[dict[str, Any]]:
    """The timeline items one command contributes to a message's life (none when it does not name it)."""
    if entry.get("tenant_id") not in (tenant_id, None):
        return []
    ctype = entry["type"]
    raw = entry.get("_payload") or {}
    base = {"source": "command", "ts": entry["ts"], "topic": "postbus.commands", "partition": entry["partition"],
            "offset": entry["offset"], "what": ctype, "command_id": entry["command_id"], "actor": entry["actor"],
            "route": entry.get("route")}
    out: list[dict[str, Any]] = []
    if ctype == "messages.add":
        for i, m in enumerate(raw.get("messages") or ()):
            if m.get("id") == message_id and m.get("tenant_id", tenant_id) == tenant_id:
                shown = redact(m)
                out.append({**base, "index": i, "detail": {
                    k: shown.get(k) for k in ("pk", "account_id", "from_addr", "to", "cc", "subject", "priority",
                                              "batch_code", "deferred_ts") if shown.get(k) not in (None, [], "")}})
    elif ctype in _ID_LIST_COMMANDS:
        if message_id in (raw.get("ids") or ()) and raw.get("tenant_id", tenant_id) == tenant_id:
            out.append({**base, "detail": {}})
    elif ctype == "messages.reject":
        for item in raw.get("items") or ():
            if item.get("id") == message_id:
                out.append({**base, "detail": {"reason": item.get("reason"), "account_id": item.get("account_id")}})
    elif ctype in _ENGAGEMENT_COMMANDS:
        if raw.get("message_id") == message_id and raw.get("tenant_id") == tenant_id:
            shown = redact(raw)
            out.append({**base, "detail": {k: v for k, v in shown.items()
                                            if k not in ("tenant_id", "message_id") and v is not None}})
    return out


def event_item(event: dict[str, Any], rec: Any, tenant_id: str, message_id: str) -> dict[str, Any] | None:
    if event.get("tenant_id") != tenant_id or event.get("message_id") != message_id:
        return None
    shown = redact(event)
    return {"source": "event", "ts": event["ts"], "topic": rec.topic, "partition": rec.partition,
            "offset": rec.offset, "what": event["type"],
            "detail": {k: shown[k] for k in _EVENT_FIELDS if k in shown and shown[k] is not None}}


def report_items(ack: dict[str, Any], rec: Any, tenant_id: str, message_id: str) -> list[dict[str, Any]]:
    if ack.get("tenant_id") != tenant_id:
        return []
    events = [e for e, m in zip(ack.get("event_ids") or (), ack.get("message_ids") or (), strict=False)
              if m == message_id]
    if not events:
        return []
    return [{"source": "report", "ts": ack["ts"], "topic": rec.topic, "partition": rec.partition,
             "offset": rec.offset, "what": "report.acknowledged",
             "detail": {"event_ids": events, "batch_size": len(ack.get("message_ids") or ())}}]


def sort_timeline(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {"command": 0, "event": 1, "report": 2}
    return sorted(items, key=lambda i: (i["ts"], order.get(i["source"], 3), i["topic"], i["offset"]))


def render_timeline(tenant_id: str, message_id: str, items: list[dict[str, Any]]) -> list[str]:
    lines = [f"message {message_id} of tenant {tenant_id}: {len(items)} record(s)"]
    for it in items:
        where = f"{it['topic']}[{it['partition']}]@{it['offset']}"
        head = f"{iso(it['ts'])}  {it['what']:<20} {where}"
        d = it.get("detail") or {}
        parts: list[str] = []
        if it["source"] == "command":
            parts.append(f"actor={it['actor']}")
            if it.get("route"):
                parts.append(f"route={it['route']!r}")
        if it["source"] == "event":
            if it["what"] == "sent" and "smtp_code" not in d:
                # events written before the sender recorded the reply code: "sent" means the server
                # accepted the message (a 2xx reply to the end of DATA)
                parts.append("accepted=2xx")
            for k in ("attempt", "smtp_code", "error", "deferred_reason"):
                if k in d:
                    parts.append(f"{k}={d[k]!r}" if isinstance(d[k], str) else f"{k}={d[k]}")
            if "deferred_until" in d:
                parts.append(f"until={iso(d['deferred_until'])}")
            rest = {k: v for k, v in d.items() if k not in ("attempt", "smtp_code", "error", "deferred_reason",
                                                            "deferred_until", "type", "event_id")}
            parts.extend(f"{k}={v}" for k, v in rest.items())
            parts.append(f"event_id={d.get('event_id')}")
        else:
            parts.extend(f"{k}={v}" for k, v in d.items())
        lines.append(head + "  " + " ".join(parts))
    return lines


# -- state-at -------------------------------------------------------------------------------------
class TenantState:
    """A tenant's configuration and queue, folded from its commands (kept forever: the full history)
    and, for what commands never carried, the compacted config topics."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.tenant: dict[str, Any] | None = None
        self.deleted = False
        self.accounts: dict[str, dict[str, Any]] = {}
        self.suspension: dict[str, Any] | None = None
        self.queue: dict[str, int] = {}  # message id -> command offset of its latest pending submission
        self.last_command: dict[str, Any] | None = None
        self.commands = 0
        self.events = 0

    def apply_command(self, entry: dict[str, Any]) -> None:
        if entry.get("tenant_id") != self.tenant_id:
            return
        self.commands += 1
        self.last_command = {k: entry[k] for k in ("ts", "type", "offset", "actor")}
        ctype, raw = entry["type"], entry.get("_payload") or {}
        if ctype in ("tenant.create", "tenant.update"):
            self.tenant, self.deleted = dict(raw), False
        elif ctype == "tenant.delete":
            self.tenant, self.deleted, self.suspension = None, True, None
            self.accounts.clear()
            self.queue.clear()
        elif ctype == "account.upsert":
            self.accounts[raw["id"]] = dict(raw)
        elif ctype == "account.delete":
            self.accounts.pop(raw.get("account_id"), None)
        elif ctype in ("messages.suspend", "messages.activate"):
            self.suspension = dict(raw)
        elif ctype == "messages.add":
            for m in raw.get("messages") or ():
                if m.get("tenant_id", self.tenant_id) == self.tenant_id:
                    self.queue[m["id"]] = entry["offset"]
        elif ctype in _ID_LIST_COMMANDS:
            for mid in raw.get("ids") or ():
                self.queue.pop(mid, None)
        elif ctype == "messages.reject":
            for item in raw.get("items") or ():
                self.queue.pop(item.get("id"), None)

    def apply_config(self, topic_kind: str, key: str, value: dict[str, Any] | None) -> None:
        """A compacted config record, only where the commands told nothing about that key."""
        if topic_kind == "tenant" and key == self.tenant_id and self.tenant is None and not self.deleted:
            self.tenant = dict(value) if value else None
        elif topic_kind == "account" and key.startswith(self.tenant_id + "/"):
            aid = key.split("/", 1)[1]
            if value is None:
                self.accounts.pop(aid, None)
            elif aid not in self.accounts:
                self.accounts[aid] = dict(value)
        elif topic_kind == "suspension" and key == self.tenant_id and self.suspension is None:
            self.suspension = dict(value) if value else None

    def apply_event(self, event: dict[str, Any]) -> None:
        if event.get("tenant_id") != self.tenant_id:
            return
        self.events += 1
        if event.get("type") in FINAL_EVENTS:
            self.queue.pop(event.get("message_id"), None)

    def to_json(self, at_ms: int) -> dict[str, Any]:
        susp = self.suspension
        suspended = bool(susp and (susp.get("all") or susp.get("batches")))
        return {
            "tenant_id": self.tenant_id, "at": iso(at_ms), "at_ms": at_ms,
            "exists": self.tenant is not None,
            "tenant": redact(self.tenant) if self.tenant is not None else None,
            "accounts": [redact(self.accounts[k]) for k in sorted(self.accounts)],
            "suspension": {"suspended": suspended, "all": bool(susp and susp.get("all")),
                           "batches": list(susp.get("batches") or ()) if susp else [],
                           "updated_at": iso(susp.get("updated_ts")) if susp else None},
            "queue": {"pending": len(self.queue), "message_ids": sorted(self.queue, key=lambda m: self.queue[m])},
            "last_command": ({**self.last_command, "at": iso(self.last_command["ts"])}
                             if self.last_command else None),
            "read": {"commands": self.commands, "events": self.events},
        }


def render_state(state: dict[str, Any], max_ids: int = 50) -> list[str]:
    lines = [f"tenant {state['tenant_id']} as of {state['at']}"]
    if not state["exists"]:
        lines.append("  (the tenant did not exist at that time)")
    else:
        t = state["tenant"]
        lines.append(f"  tenant: name={t.get('name')!r} active={t.get('active')} "
                     f"client_base_url={t.get('client_base_url')!r}")
    for a in state["accounts"]:
        lines.append(f"  account {a.get('id')}: {a.get('host')}:{a.get('port')} user={a.get('user')!r} "
                     f"password={'***' if a.get('password_enc') else None}")
    s = state["suspension"]
    if s["suspended"]:
        what = "all batches" if s["all"] else "batches " + ", ".join(s["batches"])
        lines.append(f"  suspended: {what} (since {s['updated_at']})")
    else:
        lines.append("  suspended: no")
    q = state["queue"]
    ids = q["message_ids"]
    shown = ", ".join(ids[:max_ids]) + (f", ... ({len(ids) - max_ids} more)" if len(ids) > max_ids else "")
    lines.append(f"  queue: {q['pending']} pending" + (f": {shown}" if ids else ""))
    return lines
