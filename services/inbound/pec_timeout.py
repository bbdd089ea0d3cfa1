"""pec_timeout: a message sent from a PEC domain (setting ``pec_sender_domains``) that has no PEC
receipt at all ``pec_timeout_s`` after it was sent gets a ``pec`` event with ``pec_event:
pec_timeout``. The scan asks the metrics service (the event log's projection), so it keeps no state
of its own and survives restarts; the event id is deterministic per message, so a scan repeated
before the analytics saw the previous one cannot count twice."""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.settings import Settings
from services.inbound.correlate import pec_timeout_event
from services.inbound.service import Inbound

log = logging.getLogger("postbus.inbound.pec")

LOOKBACK_MS = 30 * 86400_000  # messages sent longer ago than timeout + 30 days are not watched


def pec_domains(settings: Settings) -> list[str]:
    return [d.strip().lower() for d in settings.pec_sender_domains.split(",") if d.strip()]


async def scan_once(inbound: Inbound, settings: Settings, recent: dict[str, float]) -> int:
    domains = pec_domains(settings)
    if not domains:
        return 0
    now = int(time.time() * 1000)
    before = now - int(settings.pec_timeout_s * 1000)
    r = await inbound.http.get("/internal/inbound/pec-overdue", params={
        "domains": ",".join(domains), "sent_before_ms": before, "sent_after_ms": max(0, before - LOOKBACK_MS)})
    r.raise_for_status()
    events = []
    for row in r.json()["messages"]:
        key = f"{row['tenant_id']}\x1f{row['message_id']}"
        if key in recent:
            continue
        events.append(pec_timeout_event(row, now))
        recent[key] = time.monotonic()
    await inbound.send_events(events)
    for key in [k for k, t in recent.items() if time.monotonic() - t > 3600]:
        del recent[key]
    if events:
        log.info("pec_timeout events", extra={"count": len(events)})
    return len(events)


async def run(inbound: Inbound, settings: Settings) -> None:
    recent: dict[str, float] = {}
    while True:
        try:
            await scan_once(inbound, settings, recent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pec timeout scan failed", extra={"error": str(exc)})
        await asyncio.sleep(settings.pec_scan_interval_s)
