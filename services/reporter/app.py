"""Faust app of the reporter: consumes ``postbus.events`` into a changelog-backed table of pending
reports, and ``postbus.commands`` for run-now; the :class:`Reporter` engine does the HTTP side.

Table ``pending_reports``: grouped records (``ledger.py``): one per consumed batch of events of a
partition (the pending report items), one per acknowledged sync call (the keys it acknowledged),
instead of an entry and an ack marker per event. A report is pending while its event group holds it
and no ack group names it. The ack groups exist because Faust commits offsets later than it
processes events (seconds to minutes under a backlog, measured): if the worker dies in that gap the
event is consumed again after restart, is found known and is not reported a second time. Once the
group's committed offset has passed them, acknowledged entries are dropped from their event group
(rewritten, or tombstoned when empty) and the ack group is tombstoned.

Why the changelog is written by hand: Faust only allows table writes from inside an agent (it
takes the changelog partition from the event being processed), but acknowledgements happen in the
flusher's background tasks and the events agent works on batches. So both write ``table.data``
(the local store) and send the changelog record themselves with an explicit partition: the
partition of the events a record is about (kept as ``"p"`` in the value). Events are keyed by tenant, the changelog has
the same partition count as the events topic, and Faust's assignor co-partitions a table with
its source topic, so that partition is exactly the one recovered on the worker that owns the
tenant's events.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient
from faust.types import TP

from services.common import lag
from services.common.avro import DecodeError, codec
from services.common.config_view import ConfigView
from services.common.crypto import load_secret_box
from services.common.deadletter import encode_dead_letter
from services.common.faust_support import make_app
from services.common.http_server import set_readiness, start_metrics_server
from services.common.internal_auth import load_internal_token
from services.common.settings import get_settings
from services.common.topics import (
    COMMANDS,
    CONFIG_INSTANCE,
    CONFIG_TENANTS,
    DEADLETTER,
    EVENTS,
    REPORTER_APP,
    REPORTS,
    STATUS_SYNC,
)
from services.reporter import metrics
from services.reporter.engine import Reporter
from services.reporter.ledger import Ledger
from services.reporter.protocol import report_item

log = logging.getLogger("postbus.reporter")

settings = get_settings()
SEP = "\x1f"
RUN_NOW_MAX_AGE_S = 300.0  # an old run-now replayed after a restart wakes nobody

app = make_app(REPORTER_APP, settings.kafka_bootstrap, str(settings.state_dir / "reporter"),
               settings.topic_partitions)
lag.faust_app(app)  # postbus_consumer_lag (services/common/lag.py)

events_topic = app.topic(EVENTS, key_serializer="raw", value_serializer="raw")
commands_topic = app.topic(COMMANDS, key_serializer="raw", value_serializer="raw")
deadletter_topic = app.topic(DEADLETTER, key_serializer="raw", value_serializer="raw")
reports_topic = app.topic(REPORTS, key_serializer="raw", value_serializer="raw")
status_topic = app.topic(STATUS_SYNC, key_serializer="raw", value_serializer="raw")

# keys and values are JSON (Faust's default for untyped tables): str keys, dict values
# changelog configs (fast compaction: groups are rewritten and tombstoned as reports are acked) live with the
# topic's definition in services/common/topics.py, which creates it before any worker starts
pending_reports = app.Table("pending_reports", partitions=settings.topic_partitions)

_view: ConfigView | None = None
_instance: ConfigView | None = None
_admin: AIOKafkaAdminClient | None = None


def _write(partition: int, key: str, value: Any) -> None:
    """A table record written from outside stream iteration: the store, then the changelog with the
    explicit partition (a tombstone when value is None)."""
    if value is None:
        pending_reports.data.pop(key, None)
        pending_reports.send_changelog(partition, key, None, value_serializer="raw")
    else:
        pending_reports.data[key] = value
        pending_reports.send_changelog(partition, key, value)


ledger = Ledger(_write)


def _tenant(tenant_id: str) -> dict[str, Any] | None:
    return _view.get(tenant_id) if _view is not None else None


_box = load_secret_box(settings)
load_internal_token(settings)  # outside dev mode: no start without POSTBUS_INTERNAL_TOKEN


def _decrypt(token: str | None) -> str | None:
    return _box.decrypt(token)


async def _ack(entries: list[tuple[str, int]]) -> None:
    """Make an acknowledgement durable: one ack group per partition in the store and the changelog,
    the ReportAck, then one producer flush, so only the few ms between the client's 2xx and this
    flush can re-send after a crash."""
    now = time.time()
    acked: dict[str, tuple[list[str], list[str]]] = {}  # tenant -> (event ids, message ids)
    for key, item in ledger.ack([key for key, _ in entries], now):
        tenant_id, _, event_id = key.partition(SEP)
        eids, mids = acked.setdefault(tenant_id, ([], []))
        eids.append(event_id)
        mids.append(str(item.get("id", "")))
    # what was reported, for the message projection's reported_ts (metrics service)
    for tenant_id, (eids, mids) in acked.items():
        await reports_topic.send(key=tenant_id.encode(), value=codec().encode("ReportAck", {
            "tenant_id": tenant_id, "event_ids": eids, "message_ids": mids, "ts": int(now * 1000)}))
    await app.producer.flush()


def _instance_interval() -> float | None:
    rec = _instance.get("instance") if _instance is not None else None
    return (rec or {}).get("sync_interval_seconds") or None


reporter = Reporter(settings, _tenant, _ack, _decrypt, interval_s=_instance_interval)


async def _dead_letter(message: Any, reason: str) -> None:
    try:
        await deadletter_topic.send(
            key=message.key,
            value=encode_dead_letter(
                message.topic, message.partition, message.offset, "reporter", reason,
                message.key, message.value,
            ),
        )
        log.warning("dead-lettered record", extra={"topic": message.topic, "partition": message.partition,
                                                   "offset": message.offset, "reason": reason})
    except Exception:
        log.exception("dead-letter send failed", extra={"topic": message.topic, "offset": message.offset})


@app.agent(events_topic)
async def consume_events(stream: faust.StreamT[bytes]) -> None:
    # batches: per-event stream iteration costs more CPU than the whole report path. One table
    # record per partition of a batch (an event group), not one per event. Offsets of a batch are
    # committed only after the producer flushed its changelog writes (Faust flushes the producer
    # before every commit), so a crash never skips an event that is not in the table.
    async for events in stream.take_events(1000, within=0.05):
        by_partition: dict[int, list[tuple[int, str, dict[str, Any]]]] = {}
        for event in events:
            msg = event.message
            try:
                _, ev = codec().decode(event.value, expect="DeliveryEvent")
            except DecodeError as exc:
                await _dead_letter(msg, str(exc))
                continue
            item = report_item(ev)
            metrics.EVENTS_IN.labels(ev.get("type") if item is not None else "ignored").inc()
            if item is not None:
                by_partition.setdefault(msg.partition, []).append(
                    (msg.offset, ev["tenant_id"] + SEP + ev["event_id"], item))
        for partition, reportable in by_partition.items():
            # known keys (a duplicate, or replayed after a crash and already acknowledged) are skipped
            for key, item in ledger.add(partition, reportable):
                reporter.add(key.split(SEP, 1)[0], key, item, partition)
        await app.producer.buffer.wait_until_ebb()  # back-pressure on the changelog writes


@app.agent(commands_topic)
async def consume_commands(stream: faust.StreamT[bytes]) -> None:
    async for event in stream.events():
        try:
            _, env = codec().decode(event.value, expect="CommandEnvelope")
            if env["type"] != "run-now":
                continue
            _, cmd = codec().decode(env["payload"], expect="RunNow")
        except DecodeError as exc:
            await _dead_letter(event.message, str(exc))
            continue
        if time.time() - env["ts"] / 1000.0 > RUN_NOW_MAX_AGE_S:
            continue
        log.info("run-now", extra={"tenant_id": cmd.get("tenant_id"), "override_dnd": cmd["override_dnd"]})
        reporter.run_now(cmd.get("tenant_id"), bool(cmd.get("override_dnd")))


def _active_partitions() -> set[int]:
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == EVENTS}


@pending_reports.on_recover
async def _rebuild_index() -> None:
    """After recovery the table holds every record of our partitions: rebuild the ledger and the
    in-memory index (pending reports per tenant)."""
    pending = ledger.rebuild(list(pending_reports.data.items()), _active_partitions())
    reporter.replace_all([(key.split(SEP, 1)[0], key, item, partition) for key, item, partition in pending])


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
    parts = {tp.partition for tp in revoked if tp.topic == EVENTS}
    if parts:
        reporter.drop_partitions(parts)
        ledger.drop_partitions(parts)


@app.timer(interval=10.0)
async def _expire_markers() -> None:
    """Drop acknowledged entries whose events are behind the group's committed offset: such an
    event is never consumed again, so its acknowledgement has done its job."""
    if _admin is None or not ledger.acks:
        return
    try:
        committed = await _admin.list_consumer_group_offsets(app.conf.id)
    except Exception as exc:  # the broker is briefly unavailable: try again next tick
        log.warning("cannot read committed offsets", extra={"error": repr(exc)})
        return
    n = ledger.expire({tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == EVENTS})
    if n:
        log.debug("expired acknowledgements", extra={"records": n})


@app.timer(interval=1.0)
async def _publish_sync_status() -> None:
    """Changed sync states -> compacted STATUS_SYNC (at most once per second per tenant)."""
    for tenant_id in reporter.take_dirty():
        st = reporter.state.get(tenant_id)
        if st is None:
            continue
        try:
            await status_topic.send(key=tenant_id.encode(), value=codec().encode("SyncStatus", {
                "tenant_id": tenant_id, "last_sync_ts": st.last_sync_ts or None, "dnd_until": st.dnd_until or None,
                "failures": st.failures, "last_outcome": st.last_outcome, "updated_ts": int(time.time() * 1000)}))
        except Exception as exc:  # the next change publishes again; status is informational
            log.warning("sync status not published", extra={"tenant_id": tenant_id, "error": repr(exc)})


async def _restore_sync_status() -> None:
    view = ConfigView(settings.kafka_bootstrap, STATUS_SYNC, "SyncStatus")
    try:
        await view.start()
        for tenant_id, rec in view.items.items():
            reporter.restore(tenant_id, rec.get("last_sync_ts"), rec.get("dnd_until"))
    except Exception as exc:  # without it every tenant just gets an early sync call
        log.warning("sync status not restored", extra={"error": repr(exc)})
    finally:
        await view.stop()


@app.task
async def _start_reporter() -> None:
    global _view, _admin, _instance
    set_readiness(lambda: False)  # until the flusher runs on a recovered table (_readiness)
    try:
        start_metrics_server(settings, settings.reporter_metrics_port)  # /metrics needs the internal token
    except OSError as exc:
        log.error("metrics port unavailable", extra={"port": settings.reporter_metrics_port, "error": str(exc)})
    _view = ConfigView(
        settings.kafka_bootstrap, CONFIG_TENANTS, "Tenant", on_change=reporter.on_tenant_change
    )
    await _view.start()
    _instance = ConfigView(settings.kafka_bootstrap, CONFIG_INSTANCE, "Instance",
                           on_change=lambda key, value: reporter.on_interval_change())
    await _instance.start()
    _admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await _admin.start()
    await _restore_sync_status()  # before the flusher starts: no early calls during a DND
    await reporter.start()
    set_readiness(lambda: _ready)
    log.info("reporter started", extra={"tenants": len(_view.items), "pending": reporter.pending_count()})


_ready = False  # read by the /ready probe's thread; computed in the event loop (Faust is not thread-safe)


@app.timer(0.5)
async def _readiness() -> None:
    """Ready = recovered and consuming: the pending-reports table recovered, no rebalance running."""
    global _ready
    _ready = app.tables.recovery.completed.is_set() and not getattr(app, "rebalancing", False)


@app.service
class _Shutdown(faust.Service):  # type: ignore[misc]
    """Stops the flusher and the config view with the worker (SIGTERM)."""

    async def on_stop(self) -> None:
        await reporter.stop()
        if _view is not None:
            await _view.stop()
        if _instance is not None:
            await _instance.stop()
        if _admin is not None:
            await _admin.close()

