"""The mail-proxy seed's Prometheus series on the API's public ``/metrics``:
``gmp_sent_total``, ``gmp_errors_total``, ``gmp_deferred_total``, ``gmp_rate_limited_total``
(labels tenant_id, account_id; present at zero for every configured account) and
``gmp_pending_messages``. Values come from the metrics service (ClickHouse over the event log), so
they are the same whichever API instance is scraped and however many senders run."""

from __future__ import annotations

import logging
from typing import Any

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


async def gmp_text(st: ApiState) -> str:
    counters = None
    try:
        r = await st.metrics.get("/internal/counters", timeout=5.0)
        if r.status_code == 200:
            counters = r.json()
    except Exception as exc:
        log.warning("delivery counters unavailable", extra={"error": str(exc)})
    return render(counters, list(st.accounts.items.values()))
