"""The mail-proxy sync protocol, as pure functions: report items, the client's answer, retry delays.

Kept free of Kafka/HTTP so it is unit-tested directly."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

REPORTABLE = frozenset({"sent", "error", "deferred", "rejected", "bounce", "complaint", "pec"})


def _seconds(ms: int | None) -> float | None:
    """Event times are epoch ms; the sync protocol speaks epoch seconds (float keeps the ms)."""
    return None if ms is None else round(ms / 1000.0, 3)


def report_item(event: dict[str, Any]) -> dict[str, Any] | None:
    """One ``delivery_report`` entry for a DeliveryEvent, or None when the type is not reported."""
    kind = event.get("type")
    if kind not in REPORTABLE:
        return None
    item: dict[str, Any] = {
        "id": event["message_id"],
        "tenant_id": event["tenant_id"],
        "pk": event.get("pk"),
    }
    ts = _seconds(event.get("ts"))
    if kind == "sent":
        item["sent_ts"] = ts
    elif kind in _INBOUND:
        item.update(_INBOUND[kind](event, ts))
    elif kind == "deferred":
        item["deferred_ts"] = ts
        item["deferred_reason"] = event.get("deferred_reason") or "deferred"
        if event.get("deferred_until") is not None:
            item["deferred_until"] = _seconds(event["deferred_until"])
    else:  # error, rejected: both are final failures for the client
        item["error_ts"] = ts
        item["error"] = _error_text(event, kind)
    if event.get("smtp_code") is not None and kind != "sent":  # a sent report stays the seed's {id, sent_ts}
        item["smtp_code"] = event["smtp_code"]
    return item


def _bounce(event: dict[str, Any], ts: float | None) -> dict[str, Any]:
    out = {"bounce_ts": ts, "bounce_type": event.get("bounce_type") or "hard",
           "bounce_code": event.get("bounce_code"), "bounce_reason": event.get("bounce_reason") or ""}
    if event.get("recipient"):
        out["recipient_email"] = event["recipient"]
    return out


def _complaint(event: dict[str, Any], ts: float | None) -> dict[str, Any]:
    out = {"complaint_ts": ts, "feedback_type": event.get("feedback_type") or "abuse"}
    if event.get("recipient"):
        out["recipient_email"] = event["recipient"]
    return out


def _pec(event: dict[str, Any], ts: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"pec_event": event.get("pec_event"), "pec_ts": ts}
    if event.get("pec_event") == "pec_error" and event.get("error"):
        out["error"] = event["error"]
    return out


# inbound events (services/inbound): bounces, ARF complaints, PEC receipts
_INBOUND = {"bounce": _bounce, "complaint": _complaint, "pec": _pec}


def _error_text(event: dict[str, Any], kind: str) -> str:
    if event.get("error"):
        return str(event["error"])
    if event.get("smtp_code") is not None:
        return f"SMTP {event['smtp_code']}"
    return "rejected" if kind == "rejected" else "error"


@dataclass
class Answer:
    """What the client's sync endpoint told us. ``acked`` means the batch may be deleted."""

    acked: bool
    outcome: str  # ok | http_<status> | bad_body | refused
    queued: int = 0
    next_sync_after: float | None = None
    errors: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _id_list(v: Any) -> list[str]:
    return [str(x) for x in v] if isinstance(v, list) else []


def parse_answer(status: int, body: bytes) -> Answer:
    """A 2xx with a JSON object acknowledges the batch, unless it says ``"ok": false`` explicitly
    (the application could not take the batch: retry). Anything else is retried."""
    if not 200 <= status < 300:
        return Answer(False, f"http_{status}")
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return Answer(False, "bad_body")
    if not isinstance(data, dict):
        return Answer(False, "bad_body")
    if data.get("ok") is False:
        return Answer(False, "refused", errors=_id_list(data.get("error")))
    queued = _as_float(data.get("queued"))
    nsa = _as_float(data.get("next_sync_after"))
    if nsa is not None and nsa > 1e11:  # tolerate a client answering in epoch milliseconds
        nsa /= 1000.0
    return Answer(
        True,
        "ok",
        queued=max(0, int(queued)) if queued is not None else 0,
        next_sync_after=nsa if nsa is not None and nsa > 0 else None,
        errors=_id_list(data.get("error")),
        not_found=_id_list(data.get("not_found")),
    )


def backoff_delay(
    attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None
) -> float:
    """Exponential backoff with "equal jitter": half the step is fixed (so retries never bunch at
    zero), the other half random (so tenants failing together do not retry in lockstep)."""
    step = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    r = (rng or random).random()
    return min(cap_s, step / 2 + r * step / 2)


def sync_url(tenant: dict[str, Any], default_path: str) -> str | None:
    base = (tenant.get("client_base_url") or "").strip()
    if not base:
        return None
    path = tenant.get("client_sync_path") or default_path
    return base.rstrip("/") + "/" + path.lstrip("/")
