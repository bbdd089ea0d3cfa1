"""The inbound runtime shared by the SMTP listener and the IMAP poller: keep the raw message, analyse
it, correlate it, emit its delivery events. Raw record first, then the events, both acknowledged by
the broker before the caller acknowledges the mail (250 / IMAP position): a crash in between makes
the sender retry, and the deterministic event ids make that retry harmless."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from services.common.avro import codec
from services.common.internal_auth import auth_headers, load_internal_token
from services.common.settings import Settings
from services.common.topics import EVENTS, INBOUND_RAW
from services.inbound.classify import analyse
from services.inbound.correlate import correlate, events_for, verp_ids

log = logging.getLogger("postbus.inbound")

RECEIVED = Counter("postbus_inbound_messages_total", "inbound messages by channel and kind", ["channel", "kind"])
UNMATCHED = Counter("postbus_inbound_unmatched_total", "inbound reports no known message matched", ["kind"])
EVENTS_OUT = Counter("postbus_inbound_events_total", "delivery events emitted from inbound mail", ["type"])


LOOKUP_TRIES = 6
LOOKUP_PAUSE_S = 0.5


class LookupUnavailable(RuntimeError):
    """The metrics service did not answer: the caller fails temporarily (the mail comes again)."""


class Inbound:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                         max_request_size=max(1_048_576, settings.inbound_max_message_bytes + 65536))
        # the metrics service's internal routes need the service credential (refuses to start without)
        self.http = httpx.AsyncClient(base_url=settings.metrics_url, timeout=10.0,
                                      headers=auth_headers(load_internal_token(settings)))

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.http.aclose()

    async def lookup(self, tenant_id: str | None, message_id: str | None, pk: str | None) -> dict[str, Any] | None:
        """The message, asked a few times: a report can overtake the metrics service's ingest of the
        message itself (it is a projection of the log). Still unknown while that ingest lags -> the
        mail is refused temporarily; unknown with the projection caught up -> None (unmatched)."""
        for _ in range(LOOKUP_TRIES):
            found = await self._lookup_once(tenant_id, message_id, pk)
            if found is not None:
                return found
            await asyncio.sleep(LOOKUP_PAUSE_S)
        try:
            status = (await self.http.get("/internal/ingest-status")).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise LookupUnavailable(str(exc)) from exc
        if not status.get("caught_up"):
            raise LookupUnavailable("the metrics projection is behind the log")
        return None

    async def _lookup_once(self, tenant_id: str | None, message_id: str | None, pk: str | None
                           ) -> dict[str, Any] | None:
        params = {k: v for k, v in (("tenant_id", tenant_id), ("id", message_id), ("pk", pk)) if v}
        try:
            r = await self.http.get("/internal/inbound/resolve", params=params)
        except httpx.HTTPError as exc:
            raise LookupUnavailable(str(exc)) from exc
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise LookupUnavailable(f"metrics answered {r.status_code}")
        return r.json()  # type: ignore[no-any-return]

    async def send_events(self, events: list[dict[str, Any]]) -> None:
        futures = [await self.producer.send(EVENTS, key=e["tenant_id"].encode(),
                                            value=codec().encode("DeliveryEvent", e)) for e in events]
        for fut in futures:
            await fut
        for e in events:
            EVENTS_OUT.labels(e["type"]).inc()

    async def handle(self, data: bytes, channel: str, envelope_from: str | None = None,
                     envelope_to: list[str] | None = None) -> int:
        """Store, classify, correlate, emit. Returns the number of events emitted."""
        raw_id = hashlib.sha256(data).hexdigest()[:32]
        analysis = analyse(data, envelope_from)
        RECEIVED.labels(channel, analysis.kind).inc()
        ids = verp_ids(data, envelope_to, self.settings.sender_verp_domain)
        target = await correlate(analysis.hint, self.lookup, ids) if analysis.kind != "unknown" else None
        events = events_for(analysis, target, raw_id, channel) if target is not None else []
        if analysis.kind != "unknown" and target is None:
            UNMATCHED.labels(analysis.kind).inc()
        record = {
            "id": raw_id, "received_ts": int(time.time() * 1000), "source": channel,
            "envelope_from": envelope_from, "envelope_to": list(envelope_to or []), "data": data,
            "kind": analysis.kind, "method": analysis.method,
            "tenant_id": target.tenant_id if target else None, "message_id": target.message_id if target else None,
            "events": len(events),
        }
        fut = await self.producer.send(INBOUND_RAW, key=raw_id.encode(), value=codec().encode("InboundRaw", record))
        await fut
        await self.send_events(events)
        log.info("inbound message", extra={"channel": channel, "kind": analysis.kind, "method": analysis.method,
                                           "raw_id": raw_id, "events": len(events),
                                           "tenant_id": target.tenant_id if target else None})
        return len(events)
