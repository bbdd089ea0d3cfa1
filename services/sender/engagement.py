"""Engagement and feedback agents of the sender (:func:`register`, called by services/sender/service.py).

- ``engagement``: the ``tracking.open|click|unsubscribe`` and ``feedback.bounce|complaint`` commands
  (payload ``Engagement``) the API appends become ``DeliveryEvent`` records of the same kind, so the
  reporter and the analytics see them. The event id derives from the command id: a command re-read
  after a crash gives the same event, which the metrics service does not count twice.
- ``auto_suppress``: hard bounces, complaints and unsubscribes on ``postbus.events`` (from the inbound
  service, SES, ARF, one-click) put the recipient on the tenant's suppression list: a
  ``suppression.add`` command (audit log) and the ``SuppressionEntry`` record. An address already on
  the list is left alone, so replays write nothing new.
- starts the suppression list view the pipeline check reads (services/sender/suppression.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from services.common.avro import DecodeError, codec
from services.common.topics import CONFIG_SUPPRESSION_LIST
from services.sender import suppression
from services.sender.tracking import ENGAGEMENT_COMMANDS, engagement_event

log = logging.getLogger("postbus.sender.engagement")

topics: dict[str, Any] = {}  # set by register()


SUPPRESSING_EVENTS = frozenset({"bounce", "complaint", "unsubscribe"})  # the types suppression_reason reads


def suppression_reason(event: dict[str, Any]) -> str | None:
    """Which events suppress their recipient, and with which reason."""
    if event["type"] == "bounce" and (event.get("bounce_type") or "").lower() == "hard":
        return "hard_bounce"
    if event["type"] == "complaint":
        return "complaint"
    if event["type"] == "unsubscribe":
        return "unsubscribe"
    return None


def register(app: Any, commands_topic: Any, events_topic: Any) -> None:
    topics["commands"] = commands_topic
    topics["suppression"] = app.topic(CONFIG_SUPPRESSION_LIST, key_serializer="raw", value_serializer="raw",
                                      internal=False)

    @app.task
    async def _start_suppression_view() -> None:
        await suppression.view.start()

    @app.on_before_shutdown.connect  # type: ignore[misc]
    async def _stop_suppression_view(app: Any, **kwargs: Any) -> None:
        await asyncio.gather(suppression.view.stop(), return_exceptions=True)

    @app.agent(commands_topic, name="engagement")
    async def engagement(stream: Any) -> None:
        async for event in stream.events():
            kind = codec().peek_type(event.value, "CommandEnvelope")
            if kind is not None and kind not in ENGAGEMENT_COMMANDS:
                continue  # most commands (messages.add above all): not decoded here
            try:
                _, env = codec().decode(event.value, expect="CommandEnvelope")
                if env["type"] not in ENGAGEMENT_COMMANDS:
                    continue
                _, hit = codec().decode(env["payload"], expect="Engagement")
            except DecodeError:
                continue  # the ingest agent dead-letters undecodable commands
            try:
                out = codec().encode("DeliveryEvent", engagement_event(env["command_id"], hit))
                await (await events_topic.send(key=hit["tenant_id"].encode(), value=out))
            except Exception:
                log.exception("engagement command not turned into an event", extra={"type": env["type"]})

    @app.agent(events_topic, name="auto_suppress")
    async def auto_suppress(stream: Any) -> None:
        async for record in stream.events():
            kind = codec().peek_type(record.value, "DeliveryEvent")
            if kind is not None and kind not in SUPPRESSING_EVENTS:
                continue  # sent, deferred, opened, ...: not decoded
            try:
                _, event = codec().decode(record.value, expect="DeliveryEvent")
            except DecodeError:
                continue
            reason = suppression_reason(event)
            address = (event.get("recipient") or "").strip().lower()
            if reason is None or not address or "@" not in address:
                continue
            if not suppression.view.ready.is_set():
                await suppression.view.ready.wait()
            key = suppression.entry_key(event["tenant_id"], address)
            if suppression.view.get(key) is not None:
                continue
            try:
                await _suppress(event, address, reason, key)
            except Exception:
                log.exception("auto-suppression failed", extra={"tenant_id": event["tenant_id"]})


async def _suppress(event: dict[str, Any], address: str, reason: str, key: str) -> None:
    tenant_id = event["tenant_id"]
    now = int(time.time() * 1000)
    detail = event.get("bounce_reason") or event.get("feedback_type") or event.get("bounce_code")
    entry = {"tenant_id": tenant_id, "address": address, "reason": reason, "detail": detail,
             "source": event.get("source"), "created_ts": now}
    change = {"tenant_id": tenant_id, "addresses": [address], "reason": reason, "source": event.get("source")}
    c = codec()
    envelope = c.encode("CommandEnvelope", {
        "command_id": uuid.uuid4().hex, "type": "suppression.add", "tenant_id": tenant_id,
        "actor": "system:auto-suppression", "ts": now, "payload_schema": "SuppressionChange",
        "payload": c.encode("SuppressionChange", change), "route": None})
    futures = [await topics["commands"].send(key=tenant_id.encode(), value=envelope),
               await topics["suppression"].send(key=key.encode(), value=c.encode("SuppressionEntry", entry))]
    await asyncio.gather(*futures)
    log.info("recipient suppressed", extra={"tenant_id": tenant_id, "reason": reason,
                                            "message_id": event.get("message_id")})
